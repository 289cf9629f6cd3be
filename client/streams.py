"""Tensor streams of the SDK: caller values to wire values, and request/response streams.

Requests are sent pre-encoded (``request_serializer=None``): the small header message is
serialized by protobuf, every chunk by :func:`~paramserve.wire.encode_chunk_item`
with one copy of the caller's bytes. Responses are decoded by :func:`decode_stream_item`,
which hands chunk payloads to the assembler as views of the received bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from paramserve.v1 import tensor_pb2 as tpb
from paramserve.wire import (
    END_ITEM,
    INDEX_DTYPE,
    SparseRows,
    StreamLayout,
    TensorAssembler,
    TensorValue,
    WireError,
    aligned_buffer,
    check_headers,
    decode_chunk_item,
    decode_merged_item,
    decode_whole,
    dtype_from_proto,
    encoded_chunk_items,
    header_for,
    merged_stream_items,
    sparse_header,
)

from .errors import DataLossError
from .results import Tensors

ShapeLookup = Callable[[str], Sequence[int]]


def as_host_array(value: Any) -> np.ndarray:
    """A NumPy view of an array-like (a host copy for CuPy arrays and Variables on GPU)."""
    from paramserve.optim_core import Variable, to_numpy  # here: admin commands never need it

    if isinstance(value, Variable):
        value = value.value
    return np.asarray(to_numpy(value))


def as_wire_value(value: Any) -> TensorValue:
    """Dense arrays stay arrays; ``(indices, values)`` tuples and IndexedSlices become rows."""
    if type(value) is np.ndarray:  # the common case, before any import or lookup
        return value
    from paramserve.optim_core import IndexedSlices

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
    """A serialized header message, every chunk of ``values`` pre-encoded, then the end item.

    The server acts only on a stream that ends with the end item, so a stream cut short
    changes nothing on the server.
    """
    yield header
    yield from encoded_chunk_items(values, chunk_bytes=chunk_bytes)
    yield END_ITEM


def merged_request_stream(
    header: bytes, values: Sequence[TensorValue], *, chunk_bytes: int
) -> Iterator[bytes]:
    """:func:`request_stream` in two messages fewer, for a server that reads merged items:
    the header (``header``: the serialized header message itself, not its wrapper) rides in
    the first chunk's message and the end item in the last one's."""
    return merged_stream_items(header, values, chunk_bytes=chunk_bytes, end=True)


def decode_stream_item(
    raw: bytes,
) -> tuple[int, int, memoryview] | tpb.TensorStreamItem | list[Any]:
    """Response deserializer for tensor streams: chunks as views, anything else via protobuf.

    A chunk's message carrying the stream's header too (``chunk_header``, a reply to a pull
    with ``merged_items``) becomes ``[header item, chunk]``: :func:`receive_tensors` takes
    them in that order. The header item is then a :class:`RawHeader`, parsed by the
    receiver, which knows the header lists that came before.
    """
    chunk = decode_chunk_item(raw)
    if chunk is not None:
        return chunk
    parts = decode_merged_item(raw)
    if parts is not None and not parts[2]:
        header, chunk, _ = parts
        if header is not None:
            return [RawHeader(bytes(header)), chunk]
    message = tpb.TensorStreamItem.FromString(raw)
    if message.HasField("chunk_header"):
        return [
            tpb.TensorStreamItem(header=message.chunk_header),
            message if message.WhichOneof("item") != "chunk" else _chunk_of(message),
        ]
    return message


def _parse_header(raw: bytes) -> tpb.TensorStreamHeader:
    try:
        return tpb.TensorStreamHeader.FromString(raw)
    except DecodeError:
        raise WireError("the stream's header does not parse as a TensorStreamHeader") from None


class RawHeader:
    """A stream's header as received, the serialized ``TensorStreamHeader``: left unparsed
    by the deserializer so that :meth:`ReplyLayouts.read` parses only what changed since
    the last pull of the same tensors (the version; at 1,000 tensors the whole header costs
    about 0.2 ms to parse, copy and key)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def _chunk_of(message: tpb.TensorStreamItem) -> tuple[int, int, memoryview]:
    chunk = message.chunk
    return chunk.tensor, chunk.offset, memoryview(chunk.data)


def _items(
    items: Iterable[tuple[int, int, memoryview] | tpb.TensorStreamItem | list[Any]],
) -> Iterator[tuple[int, int, memoryview] | tpb.TensorStreamItem]:
    """A reply's items one by one (a merged message's in order, see decode_stream_item)."""
    for item in items:
        if type(item) is list:
            yield from item
        else:
            yield item


class _Receive(NamedTuple):
    """Where a reply's tensors go (see :meth:`_ReplyPlan.into`), kept as one object so that
    threads pulling with one plan each see a consistent one."""

    into: list[np.ndarray | None]  # per tensor: the byte buffer of its array, or None
    runs: Any  # the assembler's runs for them
    widen: list[bool] | None  # per tensor: widened on arrival into its array
    arrays: list[np.ndarray | None]  # per tensor: the array received into, or None
    all_into: bool  # every tensor has an array of its own


class _ReplyPlan:
    """A reply's checked header list, its stream layout, and the buffers of the last ``out``
    arrays received into (checked once while the same arrays come back)."""

    def __init__(self, headers: list[tpb.TensorHeader]) -> None:
        check_headers(headers)
        self.layout = StreamLayout(headers)
        # The last answer of into(), with the read-only ``out`` and ``widen_into`` mappings
        # it was for (:func:`_key`): one tuple, so that threads sharing this plan each read
        # a whole one.
        self._last: tuple[Any, Any, _Receive] | None = None

    def into(
        self, out: Mapping[str, np.ndarray], widen_into: Mapping[str, np.ndarray] | None = None
    ) -> _Receive | None:
        """Where the tensors go: into ``out``'s arrays, or widened on arrival into the
        float32 arrays of ``widen_into`` (see :func:`receive_tensors`); None when neither
        names one. ValueError for an array of ``out`` that does not fit its tensor (see
        :func:`receive_buffer`)."""
        if not out and not widen_into:
            return None
        keys = (_key(out), _key(widen_into))
        kept = self._last
        last = None if kept is None else kept[2]
        if (
            kept is not None
            and keys[0] is not None
            and keys[1] is not None
            and keys[0] is kept[0]
            and keys[1] is kept[1]
        ):
            return last  # the same read-only mappings as last time (the client's own)
        names, headers = self.layout.names, self.layout.headers
        widen = None
        if widen_into:
            widen = [_widens(h, widen_into.get(n)) for h, n in zip(headers, names, strict=True)]
            if not any(widen):
                widen = None
        if widen is None:
            arrays = [out.get(n) for n in names]
        else:
            arrays = [widen_into[n] if w else out.get(n) for n, w in zip(names, widen, strict=True)]
        if (
            last is not None
            and widen == last.widen
            and all(a is b for a, b in zip(arrays, last.arrays, strict=True))
        ):
            return last
        if widen is None:
            into = [
                None if a is None else receive_buffer(h, a)
                for h, a in zip(headers, arrays, strict=True)
            ]
        else:
            into = [
                None if a is None else a.reshape(-1).view(np.uint8) if w else receive_buffer(h, a)
                for h, a, w in zip(headers, arrays, widen, strict=True)
            ]
        runs = self.layout.runs_into(into, widen)
        last = _Receive(into, runs, widen, arrays, all(a is not None for a in arrays))
        self._last = (*keys, last)
        return last


_NONE = object()  # the key of an empty mapping


def _key(mapping: Mapping[str, np.ndarray] | None) -> Any:
    """What identifies ``mapping`` for :meth:`_ReplyPlan.into`'s cache: a read-only mapping
    itself (the client's, whose arrays stay), one for any empty one, None for a mapping that
    may change (never a hit)."""
    if not mapping:
        return _NONE
    return mapping if isinstance(mapping, MappingProxyType) else None


class ReplyLayouts:
    """The :class:`_ReplyPlan` of each header list a client's pulls received, by the
    header's bytes: a worker pulls the same variables every step, so their headers are
    checked and laid out once (a few lists are kept; more clear the cache)."""

    MAX = 16

    def __init__(self) -> None:
        self._plans: dict[bytes, _ReplyPlan] = {}
        # The payload bytes of the last header list planned (the last reply's, for the
        # client's choice of stripes; with pulls in several threads, one of theirs).
        self.last_total = 0
        # Serialized headers as received, up to the fields after the tensors (version,
        # stripe), and their plans: a header that starts with one is that header list.
        self._prefixes: dict[bytes, _ReplyPlan] = {}

    def read(self, header: RawHeader | tpb.TensorStreamHeader) -> tuple[_ReplyPlan, Any]:
        """``(plan, header)`` of a received header, raw or parsed; the header returned has
        the version and stripe (its tensors only when it had to be parsed whole). A raw one
        that starts with the bytes of a header list seen before is parsed from where they
        end: protobuf reads a message's bytes cut in two as the two parts merged, and the
        part after them must hold no tensor."""
        if not isinstance(header, RawHeader):
            return self.plan(header), header
        raw = header.raw
        for prefix, plan in list(self._prefixes.items()):
            if raw.startswith(prefix):
                tail = _parse_header(raw[len(prefix) :])
                if not tail.tensors:
                    self.last_total = plan.layout.total
                    return plan, tail
        parsed = _parse_header(raw)
        plan = self.plan(parsed)
        self._learn(raw, parsed, plan)
        return plan, parsed

    def _learn(self, raw: bytes, parsed: tpb.TensorStreamHeader, plan: _ReplyPlan) -> None:
        """Keep ``raw``'s bytes before its version and stripe for :meth:`read`, where they
        are the serialized tensors alone (checked by parsing them once)."""
        tail = tpb.TensorStreamHeader(version=parsed.version)
        if parsed.HasField("stripe"):
            tail.stripe.CopyFrom(parsed.stripe)
        end = tail.SerializeToString()
        if not raw.endswith(end):
            return
        prefix = raw[: len(raw) - len(end)]
        alone = tpb.TensorStreamHeader.FromString(prefix)
        if alone.version or alone.HasField("stripe") or alone.tensors != parsed.tensors:
            return
        if len(self._prefixes) >= self.MAX:
            self._prefixes.clear()
        self._prefixes[prefix] = plan

    def plan(self, header: tpb.TensorStreamHeader) -> _ReplyPlan:
        key = tpb.TensorStreamHeader()
        key.CopyFrom(header)
        key.ClearField("version")
        key.ClearField("stripe")
        raw = key.SerializeToString()
        plan = self._plans.get(raw)
        if plan is None:
            plan = _ReplyPlan(list(header.tensors))
            if len(self._plans) >= self.MAX:
                self._plans.clear()
            self._plans[raw] = plan
        self.last_total = plan.layout.total
        return plan


def receive_tensors(
    items: Iterable[tuple[int, int, memoryview] | tpb.TensorStreamItem],
    *,
    out: Mapping[str, np.ndarray] | None = None,
    layouts: ReplyLayouts | None = None,
    widen_into: Mapping[str, np.ndarray] | None = None,
) -> Tensors:
    """Assemble a header-then-chunks response into fresh, writable arrays.

    Dense tensors named in ``out`` are written straight into those arrays (checked by
    :func:`receive_buffer` against the header), which the result then holds. Those named
    in ``widen_into`` (float32 arrays) that arrive as dense bfloat16 or float16 of the
    array's shape are widened into them chunk by chunk as they arrive (the result holds
    those arrays too); others named there arrive as they are. The other tensors are views
    of one fresh buffer. ``layouts``: a cache of checked header lists (the client's), for
    a stream whose headers came before.

    Raises :class:`DataLossError` if the stream is malformed (no header first, a second
    header, chunks out of order, a tensor cut short).
    """
    out = out or {}
    assembler: TensorAssembler | None = None
    version = 0
    used: _Receive | None = None
    try:
        for item in _items(items):
            if isinstance(item, tuple):
                chunk: Any = item
            elif assembler is None and (
                type(item) is RawHeader or item.WhichOneof("item") == "header"
            ):
                plan, header = (layouts or ReplyLayouts()).read(
                    item if type(item) is RawHeader else item.header
                )
                used = plan.into(out, widen_into)
                if used is None:
                    assembler = TensorAssembler(plan.layout.headers, layout=plan.layout)
                else:
                    assembler = TensorAssembler(
                        plan.layout.headers,
                        into=used.into,
                        widen=used.widen,
                        layout=plan.layout,
                        runs=used.runs,
                    )
                version = header.version
                continue
            elif type(item) is RawHeader:
                raise WireError("a response stream sent a second header")
            elif item.WhichOneof("item") == "chunk":
                chunk = (item.chunk.tensor, item.chunk.offset, item.chunk.data)
            else:
                raise WireError("a response stream must start with one header")
            if assembler is None:
                raise WireError("a response stream sent a chunk before its header")
            assembler.add(*chunk)
        if assembler is None:
            raise WireError("the response stream was empty (no header)")
        tensors = assembler.finish(decode_into=False)
        if used is None:
            return Tensors(tensors, version=version)
        names = assembler.layout.names
        if used.all_into:
            return Tensors(zip(names, used.arrays, strict=True), version=version)
        return Tensors(
            {n: tensors[n] if a is None else a for n, a in zip(names, used.arrays, strict=True)},
            version=version,
        )
    except WireError as e:
        raise DataLossError(f"malformed response stream: {e}") from None


class StripesUnusable(Exception):
    """A striped pull's replies cannot be put together (read the whole stream instead):
    the server sent whole streams (it predates stripes, ``unsupported``), the stripes are
    at different versions (the model moved between them) or hold different tensors, or a
    stripe starts inside an element that is widened on arrival."""

    def __init__(self, why: str, *, unsupported: bool = False) -> None:
        super().__init__(why)
        self.unsupported = unsupported


def _ended(kind: str) -> DataLossError:
    return DataLossError(f"malformed response stream: {kind}")


def receive_stripes(
    replies: Sequence[Iterable[Any]],
    *,
    out: Mapping[str, np.ndarray] | None = None,
    layouts: ReplyLayouts | None = None,
    widen_into: Mapping[str, np.ndarray] | None = None,
    run: Callable[[Callable[[], None]], Any] | None = None,
) -> Tensors:
    """:func:`receive_tensors` for a pull cut into stripes: ``replies[i]`` is the reply to
    stripe ``i`` (``PullRequest.stripe``), every one in flight. Their headers are read first
    and checked (one header list, one version, ranges that tile the payload); then each
    stripe's chunks are written straight into place, stripe 0 in this thread and the others
    through ``run(task)`` (which starts ``task`` in another thread and returns something
    with ``result()``), all into the same arrays (``out``, ``widen_into``) or one buffer.

    Raises :class:`StripesUnusable` when the replies cannot make one result (nothing the
    caller holds was written then), DataLossError for a malformed stream.
    """
    out = out or {}
    layouts = layouts or ReplyLayouts()
    streams = [_items(reply) for reply in replies]
    firsts = []
    plans = []
    for stream in streams:
        first = next(stream, None)
        if type(first) is not RawHeader and (
            first is None or isinstance(first, tuple) or first.WhichOneof("item") != "header"
        ):
            raise _ended("a response stream must start with one header")
        try:
            plan, header = layouts.read(first if type(first) is RawHeader else first.header)
        except WireError as exc:
            raise _ended(str(exc)) from None
        plans.append(plan)
        firsts.append(header)
    if not all(h.HasField("stripe") for h in firsts):
        raise StripesUnusable("the server sent whole streams, not stripes", unsupported=True)
    if any(p is not plans[0] for p in plans) or any(h.version != firsts[0].version for h in firsts):
        raise StripesUnusable("the stripes are of different versions or tensors")
    plan = plans[0]
    layout = plan.layout
    spans = [(h.stripe.start, h.stripe.end) for h in firsts]
    bounds = [0, *(e for _, e in spans)]
    if any(s != b for (s, _), b in zip(spans, bounds, strict=False)) or bounds[-1] != layout.total:
        raise _ended(f"the stripes' ranges {spans} do not cover the {layout.total} bytes")
    used = plan.into(out, widen_into)
    if used is not None and used.widen is not None and any(s % 8 for s, _ in spans):
        raise StripesUnusable("a stripe starts inside an element widened on arrival")
    buffer = None
    if used is None or not used.all_into:
        buffer = aligned_buffer(layout.buffer_bytes)
    assemblers = [
        TensorAssembler(
            layout.headers,
            into=None if used is None else used.into,
            widen=None if used is None else used.widen,
            layout=layout,
            runs=None if used is None else used.runs,
            buffer=buffer,
            span=span,
        )
        for span in spans
    ]

    failures: list[BaseException] = []  # in the order they happened
    lock = threading.Lock()

    def receive(i: int) -> dict[str, TensorValue] | None:
        """Stripe ``i``'s chunks into place; on a failure, the others are cancelled."""
        assembler, stream = assemblers[i], streams[i]
        try:
            for item in stream:
                if isinstance(item, tuple):
                    assembler.add(*item)
                elif type(item) is not RawHeader and item.WhichOneof("item") == "chunk":
                    assembler.add(item.chunk.tensor, item.chunk.offset, item.chunk.data)
                else:
                    raise WireError("a stripe sent a second header or an end item")
            return assembler.finish(decode_into=False)
        except BaseException as exc:
            if isinstance(exc, WireError):
                exc = _ended(str(exc))
            with lock:
                failures.append(exc)
            for reply in replies:
                cancel = getattr(reply, "cancel", None)
                if cancel is not None:
                    cancel()
            return None

    pending = [run(lambda i=i: receive(i)) for i in range(1, len(streams))] if run else []
    tensors = receive(0)
    for i in range(1, len(streams)):
        if not run:
            receive(i)
    for task in pending:
        task.result()
    if failures or tensors is None:
        raise failures[0]
    version = firsts[0].version
    if used is None:
        return Tensors(tensors, version=version)
    names = layout.names
    if used.all_into:
        return Tensors(zip(names, used.arrays, strict=True), version=version)
    return Tensors(
        {n: tensors[n] if a is None else a for n, a in zip(names, used.arrays, strict=True)},
        version=version,
    )


def _widens(header: tpb.TensorHeader, array: np.ndarray | None) -> bool:
    """Whether ``header``'s tensor, dense bfloat16 or float16 of ``array``'s shape, can be
    widened into ``array`` (float32) as it arrives."""
    return (
        array is not None
        and header.layout == tpb.LAYOUT_DENSE
        and header.dtype in (tpb.BFLOAT16, tpb.FLOAT16)
        and array.dtype == np.float32
        and tuple(array.shape) == tuple(header.shape)
    )


def check_out_array(name: str, array: Any) -> np.ndarray:
    """``array`` if tensors can be received into it (a writable C-contiguous NumPy array)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"out[{name!r}] must be a NumPy array; got {type(array).__name__}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError(f"out[{name!r}] must be a writable, C-contiguous NumPy array")
    return array


def receive_buffer(header: tpb.TensorHeader, array: np.ndarray) -> np.ndarray:
    """The bytes of ``array`` to receive the tensor ``header`` describes into.

    ValueError if it is not a dense tensor of the array's dtype and shape.
    """
    dtype = dtype_from_proto(header.dtype)
    if header.layout != tpb.LAYOUT_DENSE or array.dtype != dtype:
        raise ValueError(
            f"out[{header.name!r}] is {array.dtype.name} {list(array.shape)}, but the server "
            f"sent {dtype.name} {list(header.shape)}"
            + (" as sparse rows" if header.layout != tpb.LAYOUT_DENSE else "")
        )
    if tuple(array.shape) != tuple(header.shape):
        raise ValueError(
            f"out[{header.name!r}] has shape {list(array.shape)}, but the server sent "
            f"{list(header.shape)}"
        )
    return array.reshape(-1).view(np.uint8)


def receive_inline(tensors: Sequence[Any], *, version: int) -> Tensors:
    """Fresh, writable arrays from ``InlineTensor`` messages (a Step reply's weights).

    Raises :class:`DataLossError` if a header is malformed or a payload's size is wrong.
    """
    try:
        headers = [t.header for t in tensors]
        check_headers(headers)
        values = {h.name: decode_whole(h, t.data) for h, t in zip(headers, tensors, strict=True)}
        return Tensors(values, version=version)
    except WireError as e:
        raise DataLossError(f"malformed step reply: {e}") from None


def named_values(values: Mapping[str, Any]) -> tuple[list[str], list[TensorValue]]:
    """Names and wire values of a ``{name: array-like or sparse rows}`` mapping, in order.

    A list or tuple (Keras's ``grads``) is refused here, before anything is sent: pairing
    by position would silently apply a gradient to the wrong variable whenever the list's
    order is not the server's (non-trainable variables, another model's order).
    """
    if isinstance(values, list | tuple):
        raise TypeError(
            f"Tensors are passed as a {{variable name: array}} mapping; received a "
            f"{type(values).__name__} of {len(values)} values, which the SDK does not pair "
            "by position. Pass {name: array}, e.g. dict(zip(names, grads)) with the server's "
            "names in the order of your list (client.describe().variable_names lists the "
            "model's variables), or use RemoteOptimizer.apply_gradients(zip(grads, "
            "variables)), which pairs each gradient with its variable."
        )
    if not isinstance(values, Mapping):
        raise TypeError(
            "Tensors are passed as a {variable name: array} mapping, e.g. "
            "dict(zip(client.describe().variable_names, grads)). "
            f"Received: {type(values).__name__}"
        )
    names = list(values)
    if not _STR_TYPE.issuperset(map(type, names)):  # (in C; str subclasses checked below)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"Variable names must be strings. Received: {name!r}")
    given = list(map(values.__getitem__, names))
    if all_arrays(given):  # NumPy arrays already (the common case)
        return names, given
    return names, [as_wire_value(v) for v in given]


_ARRAY_TYPE = frozenset((np.ndarray,))
_STR_TYPE = frozenset((str,))


def all_arrays(values: Iterable[Any]) -> bool:
    """Whether every value is a plain NumPy array, in one C-level pass (a push may carry
    1,000 gradients)."""
    return _ARRAY_TYPE.issuperset(map(type, values))


_FLOAT_DTYPES = frozenset(np.dtype(d) for d in ("float16", "float32", "float64"))


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for the floating-point dtypes the wire carries (bfloat16, ml_dtypes' type, by
    name: asking never loads ml_dtypes)."""
    dtype = np.dtype(dtype)
    return dtype in _FLOAT_DTYPES or dtype.name == "bfloat16"


def cast_gradient(name: str, value: TensorValue, dtype: np.dtype, *, strict: bool) -> TensorValue:
    """``value`` (dense, or the values of sparse rows) in the variable's ``dtype``.

    Floating point to floating point is cast, as Keras casts gradients to the variable's
    dtype; with ``strict`` a dtype other than the variable's is a TypeError instead. A
    non-float gradient (integers, booleans, complex) for a float variable is always a
    TypeError: casting it would hide a bug. Variables of other dtypes are left to the server.
    """
    values = value.values if isinstance(value, SparseRows) else value
    have = values.dtype
    if have == dtype or not is_float_dtype(dtype):
        return value
    if strict or not is_float_dtype(have):
        why = (
            "strict_dtypes=True refuses to cast it"
            if is_float_dtype(have)
            else "only floating-point gradients are accepted for a floating-point variable"
        )
        raise TypeError(
            f"Gradient for variable {name!r} is {have.name}, but the variable is {dtype.name}: "
            f"{why}. Nothing was sent. Cast it yourself (grad.astype({dtype.name!r})) if "
            "this is intended."
        )
    cast = values.astype(dtype)
    return SparseRows(value.indices, cast) if isinstance(value, SparseRows) else cast
