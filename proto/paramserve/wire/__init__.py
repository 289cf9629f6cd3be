"""paramserve.wire: the tensor codec both the daemon and the SDK use (neither owns it).

``tensors`` (dtypes, headers, payloads, strict reassembly), ``framing`` (chunks and the
hand-encoded chunk messages of tensor streams), ``allocator`` (opt-in glibc tuning for
processes that move tensor-sized buffers).
"""

from .allocator import MALLOC_MMAP_THRESHOLD_BYTES, MALLOC_TRIM_THRESHOLD_BYTES, tune_malloc
from .framing import (
    CHUNK_BYTES,
    END_ITEM,
    decode_chunk_item,
    encode_chunk_item,
    encoded_chunk_items,
    iter_chunks,
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
    payload_views,
    sparse_header,
    whole_payload,
)

__all__ = [
    "CHUNK_BYTES",
    "END_ITEM",
    "INDEX_DTYPE",
    "MALLOC_MMAP_THRESHOLD_BYTES",
    "MALLOC_TRIM_THRESHOLD_BYTES",
    "SparseRows",
    "TensorAssembler",
    "TensorValue",
    "WireError",
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
    "iter_chunks",
    "payload_views",
    "sparse_header",
    "tune_malloc",
    "whole_payload",
]
