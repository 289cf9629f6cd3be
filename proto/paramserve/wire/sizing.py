"""Payload and Step message sizes, estimated one way for both sides.

A Step carries its tensors inline, so both directions must fit one gRPC message. The SDK
checks before it sends (its request and the reply it expects, against its own
``max_message_bytes``) and the daemon checks the reply before it applies the push (against
its ``max_message_bytes``); both use :func:`step_reply_bytes` and :func:`step_request_bytes`.
The estimates are upper bounds of the protobuf framing around each payload.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from paramserve.v1 import tensor_pb2 as tpb

from .tensors import INDEX_DTYPE

# What a StepResponse adds beyond its InlineTensors: the push result and the version.
STEP_REPLY_OVERHEAD_BYTES = 64
# The SDK's allowance per Step message instead: a request also carries the PushHeader (worker
# id, session) and the pull selection, which the SDK does not count tensor by tensor.
STEP_CLIENT_OVERHEAD_BYTES = 1024
# Per InlineTensor beyond its payload, name and shape: field tags, lengths, dtype, layout.
INLINE_OVERHEAD_BYTES = 48
# At most one tag byte and a ten-byte varint per dimension of a shape.
DIM_BYTES = 11


def payload_bytes(itemsize: int, shape: Sequence[int], rows: int | None = None) -> int:
    """Payload bytes of a tensor of ``shape``, or of ``rows`` of its rows (sparse rows)."""
    if rows is None:
        return math.prod(shape) * itemsize
    return rows * (INDEX_DTYPE.itemsize + math.prod(shape[1:]) * itemsize)


def inline_tensor_bytes(name: str, payload: int, rank: int) -> int:
    """Upper bound of one InlineTensor of ``payload`` bytes, named ``name``, of that rank."""
    return payload + len(name.encode()) + DIM_BYTES * rank + INLINE_OVERHEAD_BYTES


def step_reply_bytes(
    tensors: Iterable[tuple[str, int, int]], *, overhead: int = STEP_REPLY_OVERHEAD_BYTES
) -> int:
    """Upper bound of a StepResponse carrying ``(name, payload bytes, rank)`` tensors."""
    return overhead + sum(inline_tensor_bytes(n, size, rank) for n, size, rank in tensors)


def step_request_bytes(
    headers: Iterable[tpb.TensorHeader], *, overhead: int = STEP_CLIENT_OVERHEAD_BYTES
) -> int:
    """Upper bound of a StepRequest whose gradients ``headers`` describe."""
    return overhead + sum(h.byte_length + h.ByteSize() + INLINE_OVERHEAD_BYTES for h in headers)
