"""paramserve.wire: what the daemon and the SDK share on the wire (neither owns it).

``tensors`` (dtypes, headers, payloads, strict reassembly), ``framing`` (chunks and the
hand-encoded chunk messages of tensor streams), ``sizing`` (payload and Step message
sizes), ``service`` (the service name, the default address, JSON values), ``allocator``
(opt-in glibc tuning for processes that move tensor-sized buffers), ``compression``
(float32 tensors travelling as bfloat16 or float16, opted in per request).
"""

from .allocator import MALLOC_MMAP_THRESHOLD_BYTES, MALLOC_TRIM_THRESHOLD_BYTES, tune_malloc
from .compression import (
    COMPRESSIBLE,
    FLOAT16_MAX,
    WIRE_DTYPES,
    cast_into,
    cast_tensor,
    prepare_casts,
    round_with_feedback,
    widen_bytes,
    wire_dtype_code,
    wire_dtype_of,
)
from .framing import (
    CHUNK_BYTES,
    END_ITEM,
    decode_chunk_item,
    encode_chunk_item,
    encoded_chunk_items,
    iter_chunks,
)
from .service import DEFAULT_ADDRESS, DEFAULT_HOST, DEFAULT_PORT, SERVICE_NAME, json_default
from .sizing import (
    INLINE_OVERHEAD_BYTES,
    STEP_CLIENT_OVERHEAD_BYTES,
    STEP_REPLY_OVERHEAD_BYTES,
    inline_tensor_bytes,
    payload_bytes,
    step_reply_bytes,
    step_request_bytes,
)
from .tensors import (
    INDEX_DTYPE,
    SparseRows,
    TensorAssembler,
    TensorValue,
    WireError,
    check_headers,
    decode_payload,
    decode_whole,
    dtype_from_name,
    dtype_from_proto,
    dtype_name,
    dtype_to_proto,
    expected_bytes,
    header_for,
    load_bfloat16,
    payload_views,
    sparse_header,
    whole_payload,
)

__all__ = [
    "CHUNK_BYTES",
    "COMPRESSIBLE",
    "DEFAULT_ADDRESS",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "END_ITEM",
    "FLOAT16_MAX",
    "INDEX_DTYPE",
    "INLINE_OVERHEAD_BYTES",
    "MALLOC_MMAP_THRESHOLD_BYTES",
    "MALLOC_TRIM_THRESHOLD_BYTES",
    "SERVICE_NAME",
    "STEP_CLIENT_OVERHEAD_BYTES",
    "STEP_REPLY_OVERHEAD_BYTES",
    "WIRE_DTYPES",
    "SparseRows",
    "TensorAssembler",
    "TensorValue",
    "WireError",
    "cast_into",
    "cast_tensor",
    "check_headers",
    "decode_chunk_item",
    "decode_payload",
    "decode_whole",
    "dtype_from_name",
    "dtype_from_proto",
    "dtype_name",
    "dtype_to_proto",
    "encode_chunk_item",
    "encoded_chunk_items",
    "expected_bytes",
    "header_for",
    "inline_tensor_bytes",
    "iter_chunks",
    "json_default",
    "load_bfloat16",
    "payload_bytes",
    "payload_views",
    "prepare_casts",
    "round_with_feedback",
    "sparse_header",
    "step_reply_bytes",
    "step_request_bytes",
    "tune_malloc",
    "whole_payload",
    "widen_bytes",
    "wire_dtype_code",
    "wire_dtype_of",
]
