"""Tensor streams of the SDK: caller values to wire values, and request/response streams.

Requests are sent pre-encoded (``request_serializer=None``): the small header message is
serialized by protobuf, every chunk by :func:`~paramserve.client.tensors.encode_chunk_item`
with one copy of the caller's bytes. Responses are decoded by :func:`decode_stream_item`,
which hands chunk payloads to the assembler as views of the received bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from paramserve.optim_core import IndexedSlices, Variable, to_numpy
from paramserve.v1 import tensor_pb2 as tpb

from .errors import DataLossError
from .results import Tensors
from .tensors import (
    INDEX_DTYPE,
    SparseRows,
    TensorAssembler,
    TensorValue,
    WireError,
    check_headers,
    decode_chunk_item,
    encoded_chunk_items,
    header_for,
    payload_views,
    sparse_header,
)

ShapeLookup = Callable[[str], Sequence[int]]


def as_host_array(value: Any) -> np.ndarray:
    """A NumPy view of an array-like (a host copy for CuPy arrays and Variables on GPU)."""
    if isinstance(value, Variable):
        value = value.value
    return np.asarray(to_numpy(value))


def as_wire_value(value: Any) -> TensorValue:
    """Dense arrays stay arrays; ``(indices, values)`` tuples and IndexedSlices become rows."""
    if isinstance(value, SparseRows | IndexedSlices):
        indices, values = value.indices, value.values
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                "A sparse gradient is an (indices, values) pair; received a tuple of "
                f"length {len(value)}"
            )
        indices, values = value
    else:
        return as_host_array(value)
    indices = as_host_array(indices)
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise ValueError(
            "Sparse row indices must be a 1-D integer array. "
            f"Received: shape={indices.shape}, dtype={indices.dtype.name}"
        )
    return SparseRows(indices.astype(INDEX_DTYPE, copy=False), as_host_array(values))


def tensor_headers(
    names: Sequence[str], values: Sequence[TensorValue], variable_shape: ShapeLookup | None = None
) -> list[tpb.TensorHeader]:
    """Headers for ``values``; sparse rows ask ``variable_shape`` for their variable's shape."""
    headers = []
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, SparseRows):
            headers.append(header_for(name, value))
        elif variable_shape is None:
            raise ValueError(f"{name!r}: sparse rows are only accepted in pushes")
        else:
            headers.append(sparse_header(name, value, variable_shape(name)))
    return headers


def request_stream(
    header: bytes, values: Sequence[TensorValue], *, chunk_bytes: int
) -> Iterator[bytes]:
    """A serialized header message, then every chunk of ``values`` pre-encoded."""
    yield header
    yield from encoded_chunk_items(values, chunk_bytes=chunk_bytes)


def decode_stream_item(raw: bytes) -> tuple[int, int, memoryview] | tpb.TensorStreamItem:
    """Response deserializer for tensor streams: chunks as views, anything else via protobuf."""
    chunk = decode_chunk_item(raw)
    return chunk if chunk is not None else tpb.TensorStreamItem.FromString(raw)


def receive_tensors(items: Iterable[tuple[int, int, memoryview] | tpb.TensorStreamItem]) -> Tensors:
    """Assemble a header-then-chunks response into fresh, writable arrays.

    Raises :class:`DataLossError` if the stream is malformed (no header first, a second
    header, chunks out of order, a tensor cut short).
    """
    assembler: TensorAssembler | None = None
    version = 0
    try:
        for item in items:
            if isinstance(item, tuple):
                chunk: Any = item
            elif item.WhichOneof("item") == "header" and assembler is None:
                check_headers(item.header.tensors)
                assembler = TensorAssembler(item.header.tensors)
                version = item.header.version
                continue
            elif item.WhichOneof("item") == "chunk":
                chunk = (item.chunk.tensor, item.chunk.offset, item.chunk.data)
            else:
                raise WireError("a response stream must start with one header")
            if assembler is None:
                raise WireError("a response stream sent a chunk before its header")
            assembler.add(*chunk)
        if assembler is None:
            raise WireError("the response stream was empty (no header)")
        return Tensors(assembler.finish(), version=version)
    except WireError as e:
        raise DataLossError(f"malformed response stream: {e}") from None


def receive_inline(tensors: Sequence[Any], *, version: int) -> Tensors:
    """Fresh, writable arrays from ``InlineTensor`` messages (a Step reply's weights).

    Raises :class:`DataLossError` if a header is malformed or a payload's size is wrong.
    """
    try:
        headers = [t.header for t in tensors]
        check_headers(headers)
        assembler = TensorAssembler(headers)
        for i, tensor in enumerate(tensors):
            assembler.add(i, 0, tensor.data)
        return Tensors(assembler.finish(), version=version)
    except WireError as e:
        raise DataLossError(f"malformed step reply: {e}") from None


def inline_payload(value: TensorValue) -> bytes:
    """A tensor's whole wire payload as one ``bytes`` (for an ``InlineTensor``)."""
    return b"".join(payload_views(value))


def named_values(values: Mapping[str, Any]) -> tuple[list[str], list[TensorValue]]:
    """Names and wire values of a ``{name: array-like or sparse rows}`` mapping, in order."""
    names = list(values)
    return names, [as_wire_value(values[n]) for n in names]
