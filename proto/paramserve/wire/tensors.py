"""Tensors on the wire: dtypes, headers, payloads and their strict reassembly.

Shared by the SDK and the daemon (neither owns it). A tensor travels as a small
``TensorHeader`` (name, dtype, shape, layout, byte length) and its raw little-endian bytes.
Sending slices the caller's array without copying; receiving copies each chunk once into a
preallocated buffer. Anything malformed (unknown dtype, wrong byte length, chunks out of
order, skipped, repeated or missing) raises :class:`WireError`, which the server answers
with INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserve.v1 import tensor_pb2 as tpb

INDEX_DTYPE = np.dtype("<i8")

# bfloat16 joins these tables on first use (load_bfloat16): importing ml_dtypes costs about
# half a second of CPU, which commands that move no tensors (paramserve status) never pay.
_DTYPES: dict[int, np.dtype] = {
    tpb.FLOAT32: np.dtype("<f4"),
    tpb.FLOAT64: np.dtype("<f8"),
    tpb.FLOAT16: np.dtype("<f2"),
    tpb.INT32: np.dtype("<i4"),
    tpb.INT64: np.dtype("<i8"),
}
_PROTO_BY_NAME = {dt.name: code for code, dt in _DTYPES.items()}
# Hot-path lookups (``np.dtype.name`` costs microseconds): by dtype object, names by code.
_PROTO_BY_DTYPE = {dt: code for code, dt in _DTYPES.items()}
_NAME_BY_PROTO = {code: dt.name for code, dt in _DTYPES.items()}


def load_bfloat16() -> np.dtype:
    """The bfloat16 dtype (ml_dtypes), imported and added to the wire's dtypes on first call;
    afterwards NumPy also knows the name ``"bfloat16"``."""
    if tpb.BFLOAT16 not in _DTYPES:
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
        _PROTO_BY_NAME[dtype.name] = tpb.BFLOAT16
        _PROTO_BY_DTYPE[dtype] = tpb.BFLOAT16
        _NAME_BY_PROTO[tpb.BFLOAT16] = dtype.name
        _DTYPES[tpb.BFLOAT16] = dtype  # last: its presence means the others are set
    return _DTYPES[tpb.BFLOAT16]


class WireError(ValueError):
    """A tensor stream or header that does not describe valid data."""


@dataclass(frozen=True)
class SparseRows:
    """Rows of a variable: ``values[i]`` belongs to row ``indices[i]`` (repeats are summed)."""

    indices: np.ndarray
    values: np.ndarray


TensorValue = np.ndarray | SparseRows


def dtype_to_proto(dtype: Any) -> int:
    """The wire enum for a NumPy dtype; WireError for unsupported ones."""
    if isinstance(dtype, np.dtype) and dtype in _PROTO_BY_DTYPE:
        return _PROTO_BY_DTYPE[dtype]
    load_bfloat16()
    name = np.dtype(dtype).name
    if name not in _PROTO_BY_NAME:
        raise WireError(f"dtype {name} cannot travel; supported: {sorted(_PROTO_BY_NAME)}")
    return _PROTO_BY_NAME[name]


def dtype_from_proto(code: int) -> np.dtype:
    """The NumPy dtype for a wire enum; WireError for unknown codes."""
    if code not in _DTYPES:
        load_bfloat16()
    if code not in _DTYPES:
        raise WireError(f"unknown dtype code {code}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[code]


def dtype_name(code: int) -> str:
    if code in _NAME_BY_PROTO:
        return _NAME_BY_PROTO[code]
    return dtype_from_proto(code).name


def dtype_from_name(name: str) -> np.dtype:
    """The NumPy dtype for a wire-supported dtype name (``"bfloat16"`` included)."""
    if name not in _PROTO_BY_NAME:
        load_bfloat16()
    if name not in _PROTO_BY_NAME:
        raise WireError(f"dtype {name} cannot travel; supported: {sorted(_PROTO_BY_NAME)}")
    return _DTYPES[_PROTO_BY_NAME[name]]


def _le(array: np.ndarray) -> np.ndarray:
    """Little-endian, C-contiguous view (a copy only when the input is neither)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def header_for(name: str, value: TensorValue) -> tpb.TensorHeader:
    """The header describing ``value``; sparse rows need the variable shape set by the caller."""
    if isinstance(value, SparseRows):
        raise TypeError("use sparse_header() for SparseRows")
    return tpb.TensorHeader(
        name=name,
        dtype=dtype_to_proto(value.dtype),
        shape=list(value.shape),
        layout=tpb.LAYOUT_DENSE,
        byte_length=int(value.nbytes),
    )


def sparse_header(name: str, rows: SparseRows, variable_shape: Sequence[int]) -> tpb.TensorHeader:
    """The header for a sparse-rows payload of a variable with ``variable_shape``."""
    n = len(rows.indices)
    return tpb.TensorHeader(
        name=name,
        dtype=dtype_to_proto(rows.values.dtype),
        shape=list(variable_shape),
        layout=tpb.LAYOUT_SPARSE_ROWS,
        num_rows=n,
        byte_length=n * INDEX_DTYPE.itemsize + int(rows.values.nbytes),
    )


def payload_views(value: TensorValue) -> list[memoryview]:
    """The byte views that make up a tensor's payload, in wire order, without copying."""
    if isinstance(value, SparseRows):
        idx = _le(np.asarray(value.indices, dtype=INDEX_DTYPE)).reshape(-1)
        # 1-D views: memoryview cannot cast an N-d view with a zero in its shape (no rows).
        values = _le(value.values).reshape(-1).view(np.uint8)
        return [memoryview(idx).cast("B"), memoryview(values).cast("B")]
    return [memoryview(_le(value).reshape(-1).view(np.uint8)).cast("B")]


def whole_payload(value: TensorValue) -> bytes:
    """A tensor's whole wire payload as one ``bytes`` (one copy), e.g. for an ``InlineTensor``."""
    if isinstance(value, np.ndarray) and value.dtype.byteorder != ">":
        return value.tobytes()  # little-endian already; tobytes writes C order
    return b"".join(payload_views(value))


def expected_bytes(header: tpb.TensorHeader) -> int:
    """Payload size implied by a header's dtype, shape, layout and row count."""
    dtype = dtype_from_proto(header.dtype)
    shape = list(header.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"tensor {header.name!r}: negative dimension in shape {shape}")
    if header.layout == tpb.LAYOUT_DENSE:
        return math.prod(shape) * dtype.itemsize  # exact: no int64 wrap-around
    if header.layout == tpb.LAYOUT_SPARSE_ROWS:
        if not shape:
            raise WireError(f"tensor {header.name!r}: sparse rows need a variable of rank >= 1")
        if header.num_rows < 0:
            raise WireError(f"tensor {header.name!r}: negative num_rows {header.num_rows}")
        row = math.prod(shape[1:]) * dtype.itemsize
        return header.num_rows * (INDEX_DTYPE.itemsize + row)
    raise WireError(f"tensor {header.name!r}: unknown layout {header.layout}")


def check_headers(
    headers: Iterable[tpb.TensorHeader], *, max_tensor_bytes: int | None = None
) -> None:
    """Validate headers on their own: names unique and set, sizes consistent, within limits."""
    seen: set[str] = set()
    for h in headers:
        if not h.name:
            raise WireError("a tensor header has an empty name")
        if h.name in seen:
            raise WireError(f"tensor {h.name!r} appears twice in one request")
        seen.add(h.name)
        size = expected_bytes(h)
        if h.byte_length != size:
            raise WireError(
                f"tensor {h.name!r}: byte_length {h.byte_length} does not match "
                f"{dtype_name(h.dtype)} {list(h.shape)} (expected {size} bytes)"
            )
        if max_tensor_bytes is not None and size > max_tensor_bytes:
            raise WireError(
                f"tensor {h.name!r} is {size} bytes, over the limit of {max_tensor_bytes}"
            )


class TensorAssembler:
    """Rebuilds tensors from a validated header list and their chunks, in strict order."""

    def __init__(
        self,
        headers: Sequence[tpb.TensorHeader],
        *,
        into: Sequence[np.ndarray | None] | None = None,
        widen: Sequence[bool] | None = None,
    ) -> None:
        """``into[i]``, when given, is the byte buffer (1-D uint8, ``byte_length`` long)
        tensor ``i`` is written to instead of a fresh one, e.g. a view of a caller's array.

        ``widen[i]`` true: tensor ``i``, dense bfloat16 or float16, is widened to float32
        chunk by chunk as it arrives, straight from the received bytes (no buffer of the wire
        dtype), and :meth:`finish` returns it as float32; ``into[i]`` then is the float32
        array's bytes (twice ``byte_length``). Whether its values were all finite comes with
        the widening, at no extra pass (:meth:`widened_finite`).
        """
        self.headers = list(headers)
        into = list(into) if into is not None else [None] * len(self.headers)
        if len(into) != len(self.headers):
            raise ValueError(f"{len(into)} buffers for {len(self.headers)} tensors")
        widen = list(widen) if widen is not None else [False] * len(self.headers)
        if len(widen) != len(self.headers):
            raise ValueError(f"{len(widen)} widen flags for {len(self.headers)} tensors")
        self._buffers = []
        # Per widened tensor: its wire dtype, a byte of an element split between two chunks,
        # and whether every value so far was finite.
        self._widen: dict[int, np.dtype] = {}
        self._pending: dict[int, int] = {}
        self._finite: dict[int, bool] = {}
        for i, (h, buf, wide) in enumerate(zip(self.headers, into, widen, strict=True)):
            size = h.byte_length
            if wide:
                dtype = dtype_from_proto(h.dtype)
                if h.layout != tpb.LAYOUT_DENSE or dtype.name not in ("bfloat16", "float16"):
                    raise ValueError(
                        f"tensor {h.name!r}: only dense bfloat16 or float16 is widened; "
                        f"got {dtype.name}"
                    )
                self._widen[i] = dtype
                self._finite[i] = True
                size *= 2
            if buf is None:
                buf = np.empty(size, dtype=np.uint8)
            elif buf.dtype != np.uint8 or buf.shape != (size,):
                raise ValueError(
                    f"tensor {h.name!r}: the buffer to receive into must be 1-D uint8 of "
                    f"{size} bytes; got {buf.dtype.name} {buf.shape}"
                )
            self._buffers.append(buf)
        if self._widen:
            from .compression import widen_bytes

            self._widen_bytes = widen_bytes
        self._received = [0] * len(self.headers)
        self._current = 0

    def add(self, tensor: int, offset: int, data: bytes | memoryview) -> None:
        """Copy one chunk into place; WireError if it is not the next expected piece."""
        if tensor >= len(self.headers):
            raise WireError(f"chunk for tensor #{tensor}, but only {len(self.headers)} declared")
        if tensor < self._current:
            raise WireError(f"chunk for tensor #{tensor} after tensor #{self._current} began")
        for skipped in range(self._current, tensor):
            if self._received[skipped] != self.headers[skipped].byte_length:
                raise WireError(
                    f"tensor {self.headers[skipped].name!r} ended early: "
                    f"{self._received[skipped]} of {self.headers[skipped].byte_length} bytes"
                )
        self._current = tensor
        if offset != self._received[tensor]:
            raise WireError(
                f"tensor {self.headers[tensor].name!r}: chunk at offset {offset}, "
                f"expected offset {self._received[tensor]} (out of order or repeated)"
            )
        end = offset + len(data)
        if end > self.headers[tensor].byte_length:
            raise WireError(
                f"tensor {self.headers[tensor].name!r}: {end} bytes sent, "
                f"header declared {self.headers[tensor].byte_length}"
            )
        if tensor in self._widen:
            self._add_widened(tensor, offset, memoryview(data).cast("B"))
        else:
            self._buffers[tensor][offset:end] = np.frombuffer(data, dtype=np.uint8)
        self._received[tensor] = end

    def _add_widened(self, tensor: int, offset: int, data: memoryview) -> None:
        """Widen the 2-byte elements completed by ``data`` into the tensor's float32 values;
        an element split between two chunks waits for its second byte."""
        if not len(data):
            return
        wire = self._widen[tensor]
        wide = self._buffers[tensor].view(np.float32)
        first, start = offset // 2, 0
        if offset % 2:  # the second byte of an element whose first byte came before
            pair = bytes((self._pending.pop(tensor), data[0]))
            self._finite[tensor] &= self._widen_bytes(pair, wide[first : first + 1], wire)
            first, start = first + 1, 1
        count = (len(data) - start) // 2
        if count:
            piece = data[start : start + 2 * count]
            finite = self._widen_bytes(piece, wide[first : first + count], wire)
            self._finite[tensor] &= finite
        if (len(data) - start) % 2:
            self._pending[tensor] = data[-1]

    def buffer(self, tensor: int) -> np.ndarray:
        """The uint8 buffer tensor ``tensor`` is assembled in (valid up to what arrived);
        for a widened tensor, its float32 values' bytes."""
        return self._buffers[tensor]

    def widens(self, tensor: int) -> bool:
        """Whether tensor ``tensor`` is widened to float32 as it arrives."""
        return tensor in self._widen

    def widened_finite(self) -> frozenset[str]:
        """Names of the widened tensors received completely with no NaN or Inf."""
        return frozenset(
            self.headers[i].name
            for i, finite in self._finite.items()
            if finite and self._received[i] == self.headers[i].byte_length
        )

    def finish(self) -> dict[str, TensorValue]:
        """All tensors by name; WireError if any payload is incomplete."""
        out: dict[str, TensorValue] = {}
        for i, (h, buf, got) in enumerate(
            zip(self.headers, self._buffers, self._received, strict=True)
        ):
            if got != h.byte_length:
                raise WireError(
                    f"tensor {h.name!r} ended early: {got} of {h.byte_length} bytes received"
                )
            if i in self._widen:
                out[h.name] = buf.view(np.float32).reshape(tuple(h.shape))
            else:
                out[h.name] = decode_payload(h, buf)
        return out


def decode_whole(header: tpb.TensorHeader, data: bytes) -> TensorValue:
    """A fresh, writable tensor from its whole payload (one message, e.g. ``InlineTensor``).

    The header must have passed :func:`check_headers`; WireError if ``data`` has the wrong
    size.
    """
    if len(data) != header.byte_length:
        raise WireError(
            f"tensor {header.name!r}: {len(data)} bytes sent, its header declared "
            f"byte_length {header.byte_length}"
        )
    return decode_payload(header, np.frombuffer(data, dtype=np.uint8).copy())


def decode_payload(header: tpb.TensorHeader, payload: np.ndarray) -> TensorValue:
    """View a complete uint8 payload as the tensor its header describes (no copy)."""
    dtype = dtype_from_proto(header.dtype)
    shape = tuple(header.shape)
    if header.layout == tpb.LAYOUT_SPARSE_ROWS:
        n = header.num_rows
        split = n * INDEX_DTYPE.itemsize
        indices = payload[:split].view(INDEX_DTYPE)
        values = payload[split:].view(dtype).reshape((n, *shape[1:]))
        return SparseRows(indices=indices, values=values)
    return payload.view(dtype).reshape(shape)
