"""Tensors on the wire: dtypes, headers, payloads and their strict reassembly.

Shared by the SDK and the daemon (neither owns it). A tensor travels as a small
``TensorHeader`` (name, dtype, shape, layout, byte length) and its raw little-endian bytes.
Sending slices the caller's array without copying; receiving copies each chunk once into a
preallocated buffer. Anything malformed (unknown dtype, wrong byte length, chunks out of
order, skipped, repeated or missing) raises :class:`WireError`, which the server answers
with INVALID_ARGUMENT.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Container, Iterable, Sequence
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


def _alignment(header: tpb.TensorHeader) -> int:
    """Where a tensor may start in a receive buffer: its item size (8 for sparse rows, whose
    payload starts with int64 indices), so every view of it is aligned."""
    if header.layout == tpb.LAYOUT_SPARSE_ROWS:
        return INDEX_DTYPE.itemsize
    return dtype_from_proto(header.dtype).itemsize


class StreamLayout:
    """Where each tensor of a checked header list lies: in the stream's payload (tensors end
    to end, in header order) and in one receive buffer (each tensor aligned to its item size).

    Computed once per header list and reusable for every stream with those headers (a
    worker sends the same headers every step). ``runs`` are the stretches that are
    contiguous in both, so a packed chunk is copied with one copy per run it touches
    (one run for a model whose variables share a dtype).
    """

    def __init__(self, headers: Sequence[tpb.TensorHeader]) -> None:
        self.headers = list(headers)
        self.names = [h.name for h in self.headers]
        self.lengths = [int(h.byte_length) for h in self.headers]
        stream_starts: list[int] = []
        buffer_starts: list[int] = []
        runs: list[tuple[int, int, int]] = []  # (stream start, stream end, buffer start)
        stream = position = 0
        for h, length in zip(self.headers, self.lengths, strict=True):
            align = _alignment(h)
            padded = -(-position // align) * align
            if runs and padded == position:
                s0, _, b0 = runs[-1]
                runs[-1] = (s0, stream + length, b0)
            else:
                runs.append((stream, stream + length, padded))
            stream_starts.append(stream)
            buffer_starts.append(padded)
            stream += length
            position = padded + length
        self.stream_starts = stream_starts
        self.buffer_starts = buffer_starts
        self.total = stream
        self.buffer_bytes = position
        self.runs = runs
        self._decoders = [
            (dtype_from_proto(h.dtype), tuple(h.shape), h.layout, h.num_rows) for h in self.headers
        ]
        # Per tensor: (name, index of its dtype in _dtypes or -1, element range in the
        # buffer viewed as that dtype, shape or None for 1-D, index) for tensors() to view
        # it with one slice; -1: sparse rows (decoded on their own).
        self._dtypes: list[np.dtype] = []
        self._entries: list[tuple[str, int, int, int, tuple[int, ...] | None, int]] = []
        for i, (name, start, length, (dtype, shape, layout, _)) in enumerate(
            zip(self.names, self.buffer_starts, self.lengths, self._decoders, strict=True)
        ):
            if layout != tpb.LAYOUT_DENSE:
                self._entries.append((name, -1, 0, 0, None, i))
                continue
            if dtype not in self._dtypes:
                self._dtypes.append(dtype)
            size = dtype.itemsize
            self._entries.append(
                (
                    name,
                    self._dtypes.index(dtype),
                    start // size,
                    (start + length) // size,
                    None if len(shape) == 1 else shape,
                    i,
                )
            )
        # Every tensor dense and of one dtype (the usual stream): tensors() slices them all
        # in one C loop (map over slice objects), then reshapes the few that are not 1-D.
        self._uniform = len(self._dtypes) == 1 and all(e[1] == 0 for e in self._entries)
        self._slices = [slice(e[2], e[3]) for e in self._entries]
        self._reshapes = [(e[0], e[4]) for e in self._entries if e[4] is not None]

    def runs_into(
        self, into: Sequence[np.ndarray | None] | None
    ) -> list[tuple[int, int, memoryview | None, int]]:
        """``(stream start, stream end, target, offset in it)`` stretches to copy chunks
        into: the shared receive buffer (target None) as :attr:`runs` lays it out, and the
        tensors with a buffer of their own in ``into`` (checked: 1-D uint8 of their
        ``byte_length``) each in a stretch of its own."""
        if not into or all(buf is None for buf in into):
            return [(s, e, None, b) for s, e, b in self.runs]
        if len(into) != len(self.headers):
            raise ValueError(f"{len(into)} buffers for {len(self.headers)} tensors")
        runs: list[tuple[int, int, memoryview | None, int]] = []
        for h, s, length, b, own in zip(
            self.headers, self.stream_starts, self.lengths, self.buffer_starts, into, strict=True
        ):
            if own is not None:
                if own.dtype != np.uint8 or own.shape != (h.byte_length,):
                    raise ValueError(
                        f"tensor {h.name!r}: the buffer to receive into must be 1-D uint8 of "
                        f"{h.byte_length} bytes; got {own.dtype.name} {own.shape}"
                    )
                runs.append((s, s + length, memoryview(own), 0))
            elif runs and runs[-1][2] is None and runs[-1][3] + (s - runs[-1][0]) == b:
                runs[-1] = (runs[-1][0], s + length, None, runs[-1][3])
            else:
                runs.append((s, s + length, None, b))
        return runs

    def tensor_at(self, position: int) -> int:
        """The tensor that stream byte ``position`` (< ``total``) belongs to: the last one
        starting at or before it (an empty tensor there is followed by the one holding it)."""
        return max(bisect.bisect_right(self.stream_starts, position) - 1, 0)

    def tensors(self, buffer: np.ndarray, *, skip: Container[int] = ()) -> dict[str, TensorValue]:
        """Views of every tensor (but those whose index is in ``skip``) in a receive buffer
        laid out as this layout says."""
        out: dict[str, TensorValue] = {}
        if skip and len(skip) == len(self.names):
            return out
        # Each dtype's view of the whole buffer (tensors start at multiples of their size).
        typed = [buffer[: buffer.size - buffer.size % d.itemsize].view(d) for d in self._dtypes]
        if self._uniform and not skip:
            out = dict(zip(self.names, map(typed[0].__getitem__, self._slices), strict=True))
            for name, shape in self._reshapes:
                out[name] = out[name].reshape(shape)
            return out
        for name, k, a, b, shape, i in self._entries:
            if skip and i in skip:
                continue
            if k >= 0:
                view = typed[k][a:b]
                out[name] = view if shape is None else view.reshape(shape)
                continue
            dtype, shape_, _, rows = self._decoders[i]
            start = self.buffer_starts[i]
            payload = buffer[start : start + self.lengths[i]]
            split = rows * INDEX_DTYPE.itemsize
            out[name] = SparseRows(
                indices=payload[:split].view(INDEX_DTYPE),
                values=payload[split:].view(dtype).reshape((rows, *shape_[1:])),
            )
        return out


class TensorAssembler:
    """Rebuilds tensors from a validated header list and their chunks, in strict order.

    Chunks may be packed: one chunk's data runs on from the tensor and offset it names into
    the tensors after it (see ``paramserve.wire.framing``). Anything out of order, repeated,
    skipped, short or past the last tensor is refused.
    """

    def __init__(
        self,
        headers: Sequence[tpb.TensorHeader],
        *,
        into: Sequence[np.ndarray | None] | None = None,
        layout: StreamLayout | None = None,
        runs: list[tuple[int, int, memoryview | None, int]] | None = None,
    ) -> None:
        """``into[i]``, when given, is the byte buffer (1-D uint8, ``byte_length`` long)
        tensor ``i`` is written to instead of the shared receive buffer, e.g. a view of a
        caller's array. ``layout``: the headers' :class:`StreamLayout`, when the caller
        keeps one (it is computed otherwise); ``runs``: ``layout.runs_into(into)``, when
        the caller keeps that too."""
        self.layout = layout if layout is not None else StreamLayout(headers)
        self.headers = self.layout.headers
        self._into: dict[int, np.ndarray] = {}
        if into is not None:
            into = list(into)
            if len(into) != len(self.headers):
                raise ValueError(f"{len(into)} buffers for {len(self.headers)} tensors")
            self._into = {i: buf for i, buf in enumerate(into) if buf is not None}
        if runs is None:
            runs = self.layout.runs_into(into)
        shared = len(self._into) < len(self.headers)
        self._buffer = np.empty(self.layout.buffer_bytes if shared else 0, dtype=np.uint8)
        self._target = memoryview(self._buffer)
        self._runs = runs
        self._run = 0
        self._pos = 0  # stream bytes received
        self._current = 0  # the tensor the last byte went to (or the last chunk named)

    @property
    def received(self) -> int:
        """Payload bytes taken so far (the stream position)."""
        return self._pos

    @property
    def receive_buffer(self) -> np.ndarray:
        """The shared receive buffer (tensors not received into a buffer of their own)."""
        return self._buffer

    def add(self, tensor: int, offset: int, data: bytes | memoryview) -> None:
        """Copy one chunk into place; WireError if it is not the next expected piece."""
        lay = self.layout
        if tensor >= len(lay.lengths):
            raise WireError(f"chunk for tensor #{tensor}, but only {len(lay.lengths)} declared")
        pos = self._pos
        if tensor < self._current or lay.stream_starts[tensor] + offset != pos:
            self._refuse(tensor, offset)
        if offset > lay.lengths[tensor]:
            self._refuse(tensor, offset)
        n = len(data)
        if pos + n > lay.total:
            h = lay.headers[tensor]
            raise WireError(
                f"tensor {h.name!r}: {offset + n} bytes sent from its start, past the end of "
                f"the stream (the header declared {h.byte_length} bytes for it, "
                f"{lay.total - lay.stream_starts[tensor]} with the tensors after it)"
            )
        if n:
            source = data if isinstance(data, memoryview) else memoryview(data)
            if source.format != "B" or source.ndim != 1:
                source = source.cast("B")
            runs, r, done = self._runs, self._run, 0
            while done < n:
                start, end, target, base = runs[r]
                if pos >= end:
                    r += 1
                    continue
                if target is None:
                    target = self._target
                take = end - pos
                if take > n - done:
                    take = n - done
                at = base + pos - start
                target[at : at + take] = source[done : done + take]
                done += take
                pos += take
            self._run = r
            self._pos = pos
            self._current = lay.tensor_at(pos - 1)
        else:
            self._current = max(self._current, tensor)

    def _refuse(self, tensor: int, offset: int) -> None:
        """Raise the WireError that says how chunk ``(tensor, offset)`` is out of order."""
        lay = self.layout
        if tensor < self._current:
            raise WireError(f"chunk for tensor #{tensor} after tensor #{self._current} began")
        for skipped in range(self._current, tensor):
            got = max(0, min(self._pos - lay.stream_starts[skipped], lay.lengths[skipped]))
            if got != lay.lengths[skipped]:
                raise WireError(
                    f"tensor {lay.names[skipped]!r} ended early: "
                    f"{got} of {lay.lengths[skipped]} bytes"
                )
        expected = max(0, self._pos - lay.stream_starts[tensor])
        raise WireError(
            f"tensor {lay.names[tensor]!r}: chunk at offset {offset}, "
            f"expected offset {expected} (out of order or repeated)"
        )

    def buffer(self, tensor: int) -> np.ndarray:
        """The uint8 buffer tensor ``tensor`` is assembled in (valid up to what arrived)."""
        own = self._into.get(tensor)
        if own is not None:
            return own
        start = self.layout.buffer_starts[tensor]
        return self._buffer[start : start + self.layout.lengths[tensor]]

    def finish(self, *, decode_into: bool = True) -> dict[str, TensorValue]:
        """All tensors by name; WireError if any payload is incomplete. ``decode_into=False``
        leaves out the tensors received into buffers of their own (the caller holds them)."""
        lay = self.layout
        if self._pos != lay.total:
            i = lay.tensor_at(self._pos)
            got = self._pos - lay.stream_starts[i]
            raise WireError(
                f"tensor {lay.names[i]!r} ended early: {got} of {lay.lengths[i]} bytes received"
            )
        out = lay.tensors(self._buffer, skip=self._into)
        if decode_into:
            for i, buf in self._into.items():
                out[lay.names[i]] = decode_payload(lay.headers[i], buf)
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
