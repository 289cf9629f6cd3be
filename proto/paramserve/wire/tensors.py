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
from collections.abc import Callable, Container, Iterable, Sequence
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


_WIDENED = np.dtype("<f4")  # what a widened tensor becomes (see StreamLayout's widen)

# A stretch of the stream to copy (or widen) into place: (stream start, stream end, target,
# offset of the stream start in it, wire dtype of a widened stretch or None). The target is
# a byte memoryview (a float32 array for a widened stretch), or None for the shared receive
# buffer; a widened stretch's offset is in bytes of the float32 values.
Run = tuple[int, int, Any, int, "np.dtype | None"]


class _Scatter:
    """The target of a run of tensors that lie end to end in the stream, each going into an
    array of its own (:meth:`StreamLayout.runs_into`): widened into float32 arrays (``unit``
    2, the wire dtype's size; ``wire.compression.scatter_bytes``) or copied into byte
    buffers (``unit`` 1; ``wire.compression.scatter_copy``), a chunk's piece of them by one
    kernel call. ``runs`` are the per-tensor runs it stands for, the way back for a piece
    the kernel does not take."""

    __slots__ = ("addresses", "arrays", "ends", "runs", "starts")

    def __init__(self, runs: list[Run], unit: int) -> None:
        self.runs = runs
        self.starts = [r[0] for r in runs]
        # Held: the kernel writes by address.
        self.arrays = [np.asarray(r[2]) if unit == 1 else r[2] for r in runs]
        self.addresses = np.array([a.ctypes.data for a in self.arrays], dtype=np.int64)
        first = runs[0][0]
        self.ends = np.array([(r[1] - first) // unit for r in runs], dtype=np.int64)


# Tensors copied into buffers of their own are scattered by one kernel call from this many
# on: fewer cost little tensor by tensor, and the kernels cost a load (a fraction of a
# second from the cache) the first time.
SCATTER_COPY_MIN = 16


def _scattered(runs: list[Run]) -> list[Run]:
    """``runs`` with each stretch of runs into arrays of their own that lie end to end in
    the stream made one run, a :class:`_Scatter`'s: two or more widened (one wire dtype)
    float32 arrays, or :data:`SCATTER_COPY_MIN` or more byte buffers copied into."""
    from .compression import can_scatter

    out: list[Run] = []
    group: list[Run] = []

    def flush() -> None:
        widened = bool(group) and group[0][4] is not None
        if len(group) >= (2 if widened else SCATTER_COPY_MIN):
            target = _Scatter(list(group), 2 if widened else 1)
            out.append((group[0][0], group[-1][1], target, 0, group[0][4]))
        else:
            out.extend(group)
        group.clear()

    for run in runs:
        start, _, target, base, wire = run
        if base == 0 and (
            (type(target) is memoryview and wire is None)
            or (wire is not None and isinstance(target, np.ndarray) and can_scatter(target))
        ):
            if group and (group[-1][1] != start or group[-1][4] != wire):
                flush()
            group.append(run)
            continue
        flush()
        out.append(run)
    flush()
    return out


def _widened_dtype(header: tpb.TensorHeader) -> np.dtype:
    """The wire dtype of a tensor to widen to float32 (ValueError unless dense bfloat16 or
    float16)."""
    dtype = dtype_from_proto(header.dtype)
    if header.layout != tpb.LAYOUT_DENSE or dtype.name not in ("bfloat16", "float16"):
        raise ValueError(
            f"tensor {header.name!r}: only dense bfloat16 or float16 is widened; got {dtype.name}"
        )
    return dtype


class StreamLayout:
    """Where each tensor of a checked header list lies: in the stream's payload (tensors end
    to end, in header order) and in one receive buffer (each tensor aligned to its item size).

    Computed once per header list and reusable for every stream with those headers (a
    worker sends the same headers every step). ``runs`` are the stretches that are
    contiguous in both, so a packed chunk is copied with one copy per run it touches
    (one run for a model whose variables share a dtype).

    ``widen[i]`` true: tensor ``i``, dense bfloat16 or float16, is widened to float32 as it
    arrives, straight from the received bytes (see :class:`TensorAssembler`): it takes
    twice its ``byte_length`` in the receive buffer, as float32, and widened tensors of one
    wire dtype lying end to end make one run too.
    """

    def __init__(
        self, headers: Sequence[tpb.TensorHeader], *, widen: Sequence[bool] | None = None
    ) -> None:
        self.headers = list(headers)
        self.names = [h.name for h in self.headers]
        self.lengths = [int(h.byte_length) for h in self.headers]
        if widen is not None and len(widen) != len(self.headers):
            raise ValueError(f"{len(widen)} widen flags for {len(self.headers)} tensors")
        # Per tensor: its wire dtype when it is widened to float32 on arrival, else None.
        self.wire_dtypes: list[np.dtype | None] = [
            _widened_dtype(h) if widen is not None and widen[i] else None
            for i, h in enumerate(self.headers)
        ]
        self.widened = [w is not None for w in self.wire_dtypes]
        self.widened_indices = frozenset(i for i, w in enumerate(self.widened) if w)
        self.widened_names = frozenset(
            n for n, w in zip(self.names, self.widened, strict=True) if w
        )
        stream_starts: list[int] = []
        buffer_starts: list[int] = []
        runs: list[tuple[int, int, int, np.dtype | None]] = []
        # (stream start, stream end, buffer start, wire dtype of a widened run or None)
        stream = position = 0
        for h, length, wire in zip(self.headers, self.lengths, self.wire_dtypes, strict=True):
            align = _WIDENED.itemsize if wire is not None else _alignment(h)
            padded = -(-position // align) * align
            if runs and padded == position and runs[-1][3] == wire:
                s0, _, b0, _ = runs[-1]
                runs[-1] = (s0, stream + length, b0, wire)
            else:
                runs.append((stream, stream + length, padded, wire))
            stream_starts.append(stream)
            buffer_starts.append(padded)
            stream += length
            position = padded + (2 * length if wire is not None else length)
        self.stream_starts = stream_starts
        self.buffer_starts = buffer_starts
        # Bytes each tensor takes in the receive buffer (twice its length when widened).
        self.buffer_lengths = [
            2 * n if w is not None else n
            for n, w in zip(self.lengths, self.wire_dtypes, strict=True)
        ]
        self.total = stream
        self.buffer_bytes = position
        self.runs = runs
        self._decoders = [
            (
                _WIDENED if wire is not None else dtype_from_proto(h.dtype),
                tuple(h.shape),
                h.layout,
                h.num_rows,
            )
            for h, wire in zip(self.headers, self.wire_dtypes, strict=True)
        ]
        # Per tensor: (name, index of its dtype in _dtypes or -1, element range in the
        # buffer viewed as that dtype, shape or None for 1-D, index) for tensors() to view
        # it with one slice; -1: sparse rows (decoded on their own).
        self._dtypes: list[np.dtype] = []
        self._entries: list[tuple[str, int, int, int, tuple[int, ...] | None, int]] = []
        for i, (name, start, length, (dtype, shape, layout, _)) in enumerate(
            zip(self.names, self.buffer_starts, self.buffer_lengths, self._decoders, strict=True)
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
        self,
        into: Sequence[np.ndarray | None] | None,
        widen: Sequence[bool] | None = None,
    ) -> list[Run]:
        """The stretches (:data:`Run`) to copy chunks into: the shared receive buffer
        (target None) as :attr:`runs` lays it out, and the tensors with a buffer of their
        own in ``into`` each in a stretch of its own. Such a buffer is checked: 1-D uint8 of
        the tensor's ``byte_length``, or twice that for a tensor widened on arrival (this
        layout's ``widen``, or ``widen[i]`` for one with a buffer of its own), its float32
        values' bytes."""
        if not into or all(buf is None for buf in into):
            return [(s, e, None, b, w) for s, e, b, w in self.runs]
        if len(into) != len(self.headers):
            raise ValueError(f"{len(into)} buffers for {len(self.headers)} tensors")
        if widen is not None and len(widen) != len(self.headers):
            raise ValueError(f"{len(widen)} widen flags for {len(self.headers)} tensors")
        runs: list[Run] = []
        for i, (h, s, length, b, own, wire) in enumerate(
            zip(
                self.headers,
                self.stream_starts,
                self.lengths,
                self.buffer_starts,
                into,
                self.wire_dtypes,
                strict=True,
            )
        ):
            if own is not None:
                if wire is None and widen is not None and widen[i]:
                    wire = _widened_dtype(h)
                size = 2 * h.byte_length if wire is not None else h.byte_length
                if own.dtype != np.uint8 or own.shape != (size,):
                    raise ValueError(
                        f"tensor {h.name!r}: the buffer to receive into must be 1-D uint8 of "
                        f"{size} bytes; got {own.dtype.name} {own.shape}"
                    )
                target = own.view(_WIDENED) if wire is not None else memoryview(own)
                runs.append((s, s + length, target, 0, wire))
                continue
            if widen is not None and bool(widen[i]) != (wire is not None):
                raise ValueError(
                    f"tensor {h.name!r}: widened on arrival only into a buffer of its own or "
                    "as its stream layout says"
                )
            last = runs[-1] if runs else None
            if (
                last is not None
                and last[2] is None
                and last[4] == wire
                and last[3] + (s - last[0]) * (2 if wire is not None else 1) == b
            ):
                runs[-1] = (last[0], s + length, None, last[3], wire)
            else:
                runs.append((s, s + length, None, b, wire))
        if sum(r[2] is not None for r in runs) > 1:  # into two or more arrays of their own
            runs = _scattered(runs)
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


# Receive buffers start on a cache line, so that tensors received into them (gradients the
# daemon applies, weights a pull returns) are as aligned as NumPy's own arrays or better.
BUFFER_ALIGNMENT = 64


def aligned_buffer(nbytes: int) -> np.ndarray:
    """An uninitialised 1-D uint8 buffer of ``nbytes`` starting at a multiple of
    :data:`BUFFER_ALIGNMENT` bytes."""
    raw = np.empty(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
    start = -raw.__array_interface__["data"][0] % BUFFER_ALIGNMENT  # (.ctypes costs ~5 us)
    return raw[start : start + nbytes]


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
        widen: Sequence[bool] | None = None,
        layout: StreamLayout | None = None,
        runs: list[Run] | None = None,
        buffer: np.ndarray | None = None,
        span: tuple[int, int] | None = None,
        copy: Callable[[memoryview, int, memoryview, int], None] | None = None,
    ) -> None:
        """``into[i]``, when given, is the byte buffer (1-D uint8, ``byte_length`` long)
        tensor ``i`` is written to instead of the shared receive buffer, e.g. a view of a
        caller's array. ``layout``: the headers' :class:`StreamLayout`, when the caller
        keeps one (it is computed otherwise, with ``widen``); ``runs``:
        ``layout.runs_into(into, widen)``, when the caller keeps that too.

        ``span``: only stream bytes ``[start, end)`` arrive here (one stripe of a striped
        pull; chunks still name tensors and offsets in the whole stream), into ``buffer``
        (the shared receive buffer, 1-D uint8 of ``layout.buffer_bytes``) that the other
        stripes' assemblers fill too; :meth:`finish` then checks this span alone and
        returns views of the whole buffer. A span should start on an element boundary of
        any tensor widened on arrival (an element cut there is not put together).

        ``copy(target, at, piece, position)``: copies each piece of a chunk that is not
        widened into ``target[at:at + len(piece)]`` (``position``: the stream position of
        its first byte) instead of a plain copy, e.g. to check the values on the way.

        ``widen[i]`` true: tensor ``i``, dense bfloat16 or float16, is widened to float32
        chunk by chunk as it arrives, straight from the received bytes (no buffer of the wire
        dtype), and :meth:`finish` returns it as float32; ``into[i]`` then is the float32
        array's bytes (twice ``byte_length``). Whether its values were all finite comes with
        the widening, at no extra pass (:meth:`widened_finite`). With a ``layout``, the
        tensors widened in the shared receive buffer are the layout's (``widen`` may add
        those with a buffer of their own).
        """
        n = len(headers) if layout is None else len(layout.headers)
        if into is not None:
            into = list(into)
            if len(into) != n:
                raise ValueError(f"{len(into)} buffers for {n} tensors")
        if widen is not None:
            widen = [bool(w) for w in widen]
            if len(widen) != n:
                raise ValueError(f"{len(widen)} widen flags for {n} tensors")
        if layout is None:
            # Those with a buffer of their own are widened there, not in the shared buffer.
            shared = widen
            if widen is not None and into is not None:
                shared = [w and b is None for w, b in zip(widen, into, strict=True)]
            layout = StreamLayout(headers, widen=shared if shared and any(shared) else None)
        self.layout = layout
        self.headers = layout.headers
        self._into: dict[int, np.ndarray] = {}
        if into is not None:
            self._into = {i: buf for i, buf in enumerate(into) if buf is not None}
        if runs is None:
            runs = layout.runs_into(into, widen)
        # Tensors widened on arrival: the layout's, and those widened into their own buffer.
        in_layout = layout.widened_indices
        self._widened = in_layout
        if widen is not None and any(widen):
            self._widened = in_layout | {i for i, w in enumerate(widen) if w}
        self._only_layout_widened = self._widened == in_layout
        if buffer is None:
            shared = len(self._into) < len(self.headers)
            buffer = aligned_buffer(self.layout.buffer_bytes if shared else 0)
        elif buffer.dtype != np.uint8 or buffer.shape != (self.layout.buffer_bytes,):
            raise ValueError(
                f"the receive buffer must be 1-D uint8 of {self.layout.buffer_bytes} bytes; "
                f"got {buffer.dtype.name} {buffer.shape}"
            )
        self._buffer = buffer
        self._target = memoryview(self._buffer)
        self._copy = copy
        self._wide: np.ndarray | None = None  # the shared buffer as float32 (widened runs)
        self._runs = runs
        self._run = 0
        start, self._end = (0, layout.total) if span is None else span
        if not 0 <= start <= self._end <= layout.total:
            raise ValueError(f"span {span} is not within the stream's {layout.total} bytes")
        self._pos = start  # stream bytes received (the stream position)
        # The tensor the last byte went to (or the last chunk named).
        self._current = layout.tensor_at(start - 1) if start else 0
        self._pending = 0  # a widened element's first byte, when its second is yet to come
        self._nonfinite: set[int] = set()  # widened tensors found holding a NaN or Inf
        if self._widened:
            from .compression import scatter_bytes, widen_bytes

            self._widen_bytes = widen_bytes
            self._scatter_bytes = scatter_bytes

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
        if pos + n > self._end:
            h = lay.headers[tensor]
            if self._end != lay.total:
                raise WireError(
                    f"tensor {h.name!r}: a chunk runs past the end of its stripe (stream "
                    f"byte {self._end})"
                )
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
                start, end, target, base, wire = runs[r]
                if pos >= end:
                    r += 1
                    continue
                take = end - pos
                if take > n - done:
                    take = n - done
                if wire is not None:
                    piece = source[done : done + take]
                    if type(target) is _Scatter:
                        self._scatter(target, wire, pos, pos - start, piece)
                    else:
                        self._widen(target, base, wire, pos, pos - start, piece)
                elif type(target) is _Scatter:
                    self._scatter_copy(target, pos, pos - start, source[done : done + take])
                else:
                    if target is None:
                        target = self._target
                    at = base + pos - start
                    if self._copy is None:
                        target[at : at + take] = source[done : done + take]
                    else:
                        self._copy(target, at, source[done : done + take], pos)
                done += take
                pos += take
            self._run = r
            self._pos = pos
            self._current = lay.tensor_at(pos - 1)
        else:
            self._current = max(self._current, tensor)

    def _widen(
        self,
        target: np.ndarray | None,
        base: int,
        wire: np.dtype,
        pos: int,
        at: int,
        data: memoryview,
    ) -> None:
        """Widen ``data``, stream bytes from ``pos`` on (byte ``at`` of a widened run), into the
        run's float32 values (``target``, or the shared buffer from byte ``base``): the
        2-byte elements it completes; an element split between two chunks waits for its
        second byte. A piece holding a NaN or Inf marks the tensors it touches."""
        if target is None:
            if self._wide is None:
                size = self._buffer.size
                self._wide = self._buffer[: size - size % 4].view(_WIDENED)
            target = self._wide
        first = base // 4 + at // 2  # the element byte ``at`` belongs to
        k, n = 0, len(data)
        finite = True
        if at % 2:  # the second byte of an element whose first byte came before
            pair = bytes((self._pending, data[0]))
            finite = self._widen_bytes(pair, target[first : first + 1], wire)
            first, k = first + 1, 1
        count = (n - k) // 2
        if count:
            piece = data[k : k + 2 * count]
            finite = self._widen_bytes(piece, target[first : first + count], wire) and finite
            k += 2 * count
        if k < n:
            self._pending = data[k]
        if not finite:
            lay = self.layout
            self._nonfinite.update(range(lay.tensor_at(pos), lay.tensor_at(pos + n - 1) + 1))

    def _scatter(
        self, scatter: _Scatter, wire: np.dtype, pos: int, at: int, data: memoryview
    ) -> None:
        """Widen ``data``, stream bytes from ``pos`` on (byte ``at`` of the stretch), into the
        stretch's arrays with one kernel call; a piece of whole elements only, all finite.
        Any other piece goes tensor by tensor (:meth:`_widen`, which also keeps an element
        split between chunks and marks the tensors holding a NaN or Inf)."""
        n = len(data)
        if not (at % 2 or n % 2) and self._scatter_bytes(
            data, scatter.addresses, scatter.ends, at // 2, wire
        ):
            return
        runs = scatter.runs
        k = max(bisect.bisect_right(scatter.starts, pos) - 1, 0)
        end = pos + n
        while k < len(runs) and runs[k][0] < end:
            start, stop, target, base, _ = runs[k]
            a, b = max(start, pos), min(stop, end)
            if a < b:
                self._widen(target, base, wire, a, a - start, data[a - pos : b - pos])
            k += 1

    def _scatter_copy(self, scatter: _Scatter, pos: int, at: int, data: memoryview) -> None:
        """Copy ``data``, stream bytes from ``pos`` on (byte ``at`` of the stretch), into the
        stretch's buffers: one kernel call once the kernels are loaded (they load in the
        background meanwhile), else tensor by tensor."""
        from .compression import scatter_copy

        if scatter_copy(data, scatter.addresses, scatter.ends, at):
            return
        runs = scatter.runs
        k = max(bisect.bisect_right(scatter.starts, pos) - 1, 0)
        end = pos + len(data)
        while k < len(runs) and runs[k][0] < end:
            start, stop, target, _, _ = runs[k]
            a, b = max(start, pos), min(stop, end)
            if a < b:
                target[a - start : b - start] = data[a - pos : b - pos]
            k += 1

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
        """The uint8 buffer tensor ``tensor`` is assembled in (valid up to what arrived);
        for a widened tensor, its float32 values' bytes."""
        own = self._into.get(tensor)
        if own is not None:
            return own
        start = self.layout.buffer_starts[tensor]
        return self._buffer[start : start + self.layout.buffer_lengths[tensor]]

    def widens(self, tensor: int) -> bool:
        """Whether tensor ``tensor`` is widened to float32 as it arrives."""
        return tensor in self._widened

    def widened_finite(self) -> frozenset[str]:
        """Names of the widened tensors received completely with no NaN or Inf."""
        lay = self.layout
        if not self._nonfinite and self._pos == lay.total and self._only_layout_widened:
            return lay.widened_names  # the usual answer, kept with the layout
        return frozenset(
            lay.names[i]
            for i in self._widened
            if i not in self._nonfinite and self._pos >= lay.stream_starts[i] + lay.lengths[i]
        )

    def finish(self, *, decode_into: bool = True) -> dict[str, TensorValue]:
        """All tensors by name; WireError if any payload is incomplete. ``decode_into=False``
        leaves out the tensors received into buffers of their own (the caller holds them);
        widened ones are float32."""
        lay = self.layout
        if self._pos != self._end:
            i = lay.tensor_at(self._pos)
            got = self._pos - lay.stream_starts[i]
            raise WireError(
                f"tensor {lay.names[i]!r} ended early: {got} of {lay.lengths[i]} bytes received"
            )
        out = lay.tensors(self._buffer, skip=self._into)
        if decode_into and self._into:
            for i, buf in self._into.items():
                h = lay.headers[i]
                if i in self._widened:
                    out[h.name] = buf.view(_WIDENED).reshape(tuple(h.shape))
                else:
                    out[h.name] = decode_payload(h, buf)
            if len(self._into) < len(lay.names):
                out = {name: out[name] for name in lay.names}  # in header order
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
