"""The fuzzed servers' model and limits, and the wire format as the proto documents it.

Written from ``tensor.proto`` (dtypes, layouts, little-endian C order, sparse rows as int64
indices then values), not from the SDK codec, so that the oracle checks the codec.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_dtypes
import numpy as np

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

MODEL_NAME = "fuzz"
OPTIMIZER = {"class_name": "SGD", "config": {"learning_rate": 0.5, "momentum": 0.9}}
OPTIMIZER_JSON = json.dumps(OPTIMIZER)


def initial_variables() -> dict[str, np.ndarray]:
    """A small model covering a matrix, a vector, a scalar, a row-sparse table and float16."""
    return {
        "dense/kernel": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3),
        "dense/bias": np.array([0.5, -0.5, 0.25], np.float32),
        "scale": np.array(2.0, np.float32),
        "embedding": np.arange(12, dtype=np.float32).reshape(6, 2) / 10,
        "half": np.array([1, 2, 3, 4, 5], np.float16),
    }


VARIABLES = {n: (v.dtype.name, v.shape) for n, v in initial_variables().items()}

# Small limits so that "over the limit" is cheap to send (max_message_bytes is the minimum the
# server accepts, 64 KiB).
MAX_MESSAGE_BYTES = 64 << 10
MAX_TENSOR_BYTES = 16 << 10
MAX_REQUEST_BYTES = 24 << 10
MAX_STATE_BYTES = 20_000
MAX_VARIABLES = 8
LIMIT_FLAGS = [
    f"--max-message-bytes={MAX_MESSAGE_BYTES}",
    f"--max-tensor-bytes={MAX_TENSOR_BYTES}",
    f"--max-request-bytes={MAX_REQUEST_BYTES}",
    f"--max-state-bytes={MAX_STATE_BYTES}",
    f"--max-variables={MAX_VARIABLES}",
]

DTYPES: dict[int, np.dtype] = {
    tpb.FLOAT32: np.dtype("<f4"),
    tpb.FLOAT64: np.dtype("<f8"),
    tpb.FLOAT16: np.dtype("<f2"),
    tpb.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    tpb.INT32: np.dtype("<i4"),
    tpb.INT64: np.dtype("<i8"),
}
CODE_OF = {dt.name: code for code, dt in DTYPES.items()}
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
INT64_MAX = 2**63 - 1


def payload_size(h: tpb.TensorHeader) -> int | None:
    """Bytes the header implies, or None when it describes no valid tensor (exact integers)."""
    if h.dtype not in DTYPES or any(d < 0 for d in h.shape):
        return None
    item = DTYPES[h.dtype].itemsize
    if h.layout == tpb.LAYOUT_DENSE:
        return math.prod(h.shape) * item
    if h.layout == tpb.LAYOUT_SPARSE_ROWS:
        if not h.shape or h.num_rows < 0:
            return None
        return h.num_rows * (8 + math.prod(h.shape[1:]) * item)
    return None


class Rows:
    """Sparse rows decoded from a payload: ``values[i]`` belongs to row ``indices[i]``."""

    def __init__(self, indices: np.ndarray, values: np.ndarray) -> None:
        self.indices, self.values = indices, values


def decode(h: tpb.TensorHeader, payload: bytes) -> np.ndarray | Rows:
    dtype = DTYPES[h.dtype]
    if h.layout == tpb.LAYOUT_SPARSE_ROWS:
        split = h.num_rows * 8
        indices = np.frombuffer(payload[:split], "<i8")
        values = np.frombuffer(payload[split:], dtype).reshape((h.num_rows, *h.shape[1:]))
        return Rows(indices, values)
    return np.frombuffer(payload, dtype).reshape(tuple(h.shape)).copy()


def dense_header(name: str, value: np.ndarray) -> tpb.TensorHeader:
    return tpb.TensorHeader(
        name=name,
        dtype=CODE_OF[value.dtype.name],
        shape=list(value.shape),
        byte_length=value.nbytes,
    )


def sparse_header(name: str, indices: np.ndarray, values: np.ndarray, shape) -> tpb.TensorHeader:
    return tpb.TensorHeader(
        name=name,
        dtype=CODE_OF[values.dtype.name],
        shape=list(shape),
        layout=tpb.LAYOUT_SPARSE_ROWS,
        num_rows=len(indices),
        byte_length=len(indices) * 8 + values.nbytes,
    )


def payload_bytes(value: Any) -> bytes:
    if isinstance(value, Rows):
        return np.asarray(value.indices, "<i8").tobytes() + value.values.tobytes()
    return np.ascontiguousarray(value).tobytes()


def chunks(payloads: list[bytes], chunk_bytes: int) -> list[tpb.TensorChunk]:
    """Chunks in the documented order: tensors in header order, offsets increasing."""
    out = []
    for i, data in enumerate(payloads):
        for start in range(0, len(data), chunk_bytes):
            out.append(
                tpb.TensorChunk(tensor=i, offset=start, data=data[start : start + chunk_bytes])
            )
    return out


def create_messages() -> list[pb.CreateModelRequest]:
    """The CreateModel stream every fuzzed server starts from."""
    values = initial_variables()
    header = pb.CreateModelHeader(
        model_name=MODEL_NAME,
        optimizer_json=OPTIMIZER_JSON,
        variables=[dense_header(n, v) for n, v in values.items()],
    )
    items = [pb.CreateModelRequest(header=header)]
    payloads = [payload_bytes(v) for v in values.values()]
    items += [pb.CreateModelRequest(chunk=c) for c in chunks(payloads, 1 << 14)]
    return [*items, pb.CreateModelRequest(end=tpb.StreamEnd())]
