"""Hypothesis strategies for tensor streams: a valid stream, then 0-3 mutations of it.

Tensor streams (Push, CreateModel, SetOptimizerState) share one generator: a list of tensor
headers with their payloads, mutated at the header level (dtype, shape, layout, num_rows,
byte_length, names, count, sizes), cut into chunks, mutated at the chunk level (dropped,
repeated, swapped, wrong tensor index or offset, longer or shorter data) and at the message
level (no header, a second header, an empty item, an oversized chunk, no messages at all, no
end item or one before the last chunk).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from paramserve import optim_core
from paramserve.v1 import tensor_pb2 as tpb

from . import spec

OVERSIZED = spec.MAX_MESSAGE_BYTES + 4096

ODD_NAMES = [
    "",
    "nope",
    "dense",
    "dense/kernel/",
    "DENSE/KERNEL",
    "dense_kernel",
    "../../etc/passwd",
    "a\x00b",
    "scale\n",
    "\x7f",
    "ünïcødé/変数",
    "\U0001f600",
    " scale",
]
names = st.one_of(
    st.sampled_from(list(spec.VARIABLES)),
    st.sampled_from(ODD_NAMES),
    st.text(max_size=12),
    st.integers(1000, 3000).map(lambda n: "v" * n),
)
huge_dims = st.sampled_from([2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 3 * 2**61])
dims = st.one_of(st.integers(0, 7), st.integers(-3, -1), huge_dims)
dtype_codes = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 42, -1, 2**31 - 1])
special = st.sampled_from([np.nan, np.inf, -np.inf])


def chance(draw, p: float) -> bool:
    """True with probability about ``p``; the simplest draw (what shrinking aims at) is False."""
    return draw(st.sampled_from(range(20))) >= round((1 - p) * 20)


def _values(draw, dtype: str, shape: tuple[int, ...], nonfinite: float) -> np.ndarray:
    width = {"float16": 16, "float32": 32}.get(dtype, 64)
    elements = st.floats(-4, 4, width=width)
    value = draw(hnp.arrays(np.dtype(dtype), shape, elements=elements))
    if value.size and chance(draw, nonfinite):
        value.reshape(-1)[draw(st.integers(0, value.size - 1))] = draw(special)
    return value


@dataclass
class Tensors:
    """Headers with their payloads (the payload may disagree with its header on purpose)."""

    headers: list[tpb.TensorHeader]
    payloads: list[bytes]


@st.composite
def gradients(draw, *, nonfinite: float = 0.15, bad_rows: float = 0.15) -> Tensors:
    """A valid push body for 1-5 variables, dense or sparse rows, sometimes NaN/Inf or bad rows."""
    chosen = draw(
        st.lists(st.sampled_from(list(spec.VARIABLES)), min_size=1, max_size=5, unique=True)
    )
    out = Tensors([], [])
    for name in chosen:
        dtype, shape = spec.VARIABLES[name]
        if shape and draw(st.booleans()):
            n = draw(st.integers(0, 4))
            low, high = (-2, shape[0] + 2) if chance(draw, bad_rows) else (0, shape[0] - 1)
            indices = np.array(
                draw(st.lists(st.integers(low, high), min_size=n, max_size=n)), np.int64
            )
            values = _values(draw, dtype, (n, *shape[1:]), nonfinite)
            out.headers.append(spec.sparse_header(name, indices, values, shape))
            out.payloads.append(spec.payload_bytes(spec.Rows(indices, values)))
        else:
            value = _values(draw, dtype, shape, nonfinite)
            out.headers.append(spec.dense_header(name, value))
            out.payloads.append(value.tobytes())
    return out


def initial_values(draw) -> Tensors:
    out = Tensors([], [])
    for name, (dtype, shape) in spec.VARIABLES.items():
        value = _values(draw, dtype, shape, 0.0)
        out.headers.append(spec.dense_header(name, value))
        out.payloads.append(value.tobytes())
    return out


def _optimizer_state_specs() -> dict[str, tuple[str, tuple[int, ...]]]:
    optimizer = optim_core.get(spec.OPTIMIZER)
    variables = [optim_core.Variable(v, path=n) for n, v in spec.initial_variables().items()]
    optimizer.build(variables)
    return {k: (v.dtype.name, v.shape) for k, v in optimizer.state_dict().items()}


STATE_SPECS = _optimizer_state_specs()


@st.composite
def optimizer_state(draw) -> Tensors:
    """A full optimizer state, sometimes with an odd step counter or learning rate."""
    out = Tensors([], [])
    for key, (dtype, shape) in STATE_SPECS.items():
        if key == "iteration":
            odd = st.sampled_from([-1, -(2**31), 2**31 - 1])
            value = np.array(draw(st.one_of(st.integers(0, 10**6), odd)), dtype)
        elif key == "learning_rate":
            value = np.array(draw(st.one_of(st.floats(1e-4, 1.0), special)), dtype)
        else:
            value = _values(draw, dtype, shape, 0.05)
        out.headers.append(spec.dense_header(key, value))
        out.payloads.append(value.tobytes())
    return out


# -- header-level mutations ----------------------------------------------------------------


def _refit(draw, t: Tensors, i: int) -> None:
    """After a header change: sometimes make byte_length and the payload agree with it again."""
    size = spec.payload_size(t.headers[i])
    choice = draw(st.sampled_from(["refit", "length only", "keep"]))
    if size is None or size > 1 << 16 or choice == "keep":
        return
    t.headers[i].byte_length = size
    if choice == "refit":
        t.payloads[i] = (
            draw(st.binary(min_size=size, max_size=size)) if size <= 64 else b"\0" * size
        )


def _set_dtype(draw, t: Tensors, i: int) -> None:
    t.headers[i].dtype = draw(dtype_codes)
    _refit(draw, t, i)


def _set_shape(draw, t: Tensors, i: int) -> None:
    h = t.headers[i]
    shape = list(h.shape)
    how = draw(st.sampled_from(["drop", "add", "replace", "random", "overflow"]))
    if how == "drop" and shape:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif how == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(dims))
    elif how == "replace" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(dims)
    elif how == "overflow":
        shape = draw(st.lists(huge_dims, min_size=2, max_size=4))
    else:
        shape = draw(st.lists(dims, max_size=5))
    h.ClearField("shape")
    h.shape.extend(shape)
    if how == "overflow" and h.dtype in spec.DTYPES and draw(st.booleans()):
        # What a codec that multiplies in int64 computes: the product wrapped around.
        h.byte_length = _wrap(_wrap(math.prod(shape)) * spec.DTYPES[h.dtype].itemsize)
        return
    _refit(draw, t, i)


def _wrap(n: int) -> int:
    return (n + 2**63) % 2**64 - 2**63


def _set_layout(draw, t: Tensors, i: int) -> None:
    t.headers[i].layout = draw(st.sampled_from([0, 1, 2, 99]))
    t.headers[i].num_rows = draw(st.integers(-2, 5))
    _refit(draw, t, i)


def _set_num_rows(draw, t: Tensors, i: int) -> None:
    t.headers[i].num_rows = draw(st.one_of(st.integers(-3, 8), st.sampled_from([2**40, -(2**63)])))
    _refit(draw, t, i)


def _set_byte_length(draw, t: Tensors, i: int) -> None:
    h = t.headers[i]
    h.byte_length = draw(
        st.one_of(
            st.integers(-8, 8).map(lambda d: min(spec.INT64_MAX, max(-(2**63), h.byte_length + d))),
            st.sampled_from([0, -1, spec.INT64_MAX, -(2**63), 2**40]),
        )
    )
    if draw(st.booleans()) and 0 <= h.byte_length <= 1 << 14:
        # The payload follows the wrong byte_length (shorter or longer than the shape says).
        t.payloads[i] = (t.payloads[i] + b"\0" * h.byte_length)[: h.byte_length]


def _set_name(draw, t: Tensors, i: int) -> None:
    t.headers[i].name = draw(names)


def _duplicate_name(draw, t: Tensors, i: int) -> None:
    t.headers[i].name = t.headers[draw(st.integers(0, len(t.headers) - 1))].name


def _drop_tensor(draw, t: Tensors, i: int) -> None:
    del t.headers[i], t.payloads[i]


def _too_many(draw, t: Tensors, i: int) -> None:
    for k in range(spec.MAX_VARIABLES + 1 - len(t.headers) + draw(st.integers(0, 3))):
        value = np.zeros(1, np.float32)
        t.headers.append(spec.dense_header(f"extra{k}", value))
        t.payloads.append(value.tobytes())


def _huge_declared(draw, t: Tensors, i: int) -> None:
    """Row-sparse tensors of a real variable declaring more bytes than the limits allow."""
    h = t.headers[i]
    if not h.shape or h.dtype not in spec.DTYPES:
        return
    row = math.prod(h.shape[1:]) * spec.DTYPES[h.dtype].itemsize + 8
    target = draw(st.sampled_from([spec.MAX_TENSOR_BYTES + 1, spec.MAX_REQUEST_BYTES // 2 + 64]))
    rows = -(-target // row)
    h.layout, h.num_rows, h.byte_length = tpb.LAYOUT_SPARSE_ROWS, rows, rows * row
    t.payloads[i] = b"\0" * (rows * row)


HEADER_MUTATIONS: list[Callable[..., None]] = [
    _set_dtype,
    _set_shape,
    _set_layout,
    _set_num_rows,
    _set_byte_length,
    _set_name,
    _duplicate_name,
    _drop_tensor,
    _too_many,
    _huge_declared,
]


# -- chunk- and message-level mutations ----------------------------------------------------


def _chunk_mutation(draw, chunks: list[tpb.TensorChunk], n_tensors: int) -> None:
    if not chunks:
        chunks.append(tpb.TensorChunk(tensor=draw(st.integers(0, 3)), data=b"\0" * 4))
        return
    k = draw(st.integers(0, len(chunks) - 1))
    how = draw(
        st.sampled_from(
            ["drop", "repeat", "swap", "tensor", "offset", "longer", "shorter", "extra", "last"]
        )
    )
    c = chunks[k]
    if how == "drop":
        del chunks[k]
    elif how == "repeat":
        chunks.insert(k, tpb.TensorChunk(tensor=c.tensor, offset=c.offset, data=c.data))
    elif how == "swap" and k + 1 < len(chunks):
        chunks[k], chunks[k + 1] = chunks[k + 1], chunks[k]
    elif how == "tensor":
        c.tensor = draw(st.one_of(st.integers(0, n_tensors + 1), st.just(2**32 - 1)))
    elif how == "offset":
        c.offset = draw(st.one_of(st.integers(0, 64), st.just(2**64 - 1)))
    elif how == "longer":
        c.data += draw(st.binary(min_size=1, max_size=16))
    elif how == "shorter" and c.data:
        c.data = c.data[: draw(st.integers(0, len(c.data) - 1))]
    elif how == "extra":
        chunks.append(tpb.TensorChunk(tensor=c.tensor, offset=c.offset + len(c.data), data=b"\1"))
    elif how == "last":
        # Everything for the last tensor first: the earlier tensors are skipped.
        last = max(x.tensor for x in chunks)
        chunks.sort(key=lambda x: x.tensor != last)


@dataclass
class StreamPlan:
    """How the header and the chunks become messages."""

    drop_header: bool = False
    second_header_at: int | None = None
    empty_item_at: int | None = None
    oversized_at: int | None = None
    no_messages: bool = False
    # "last" (the protocol), "missing", or "early": before the last item.
    end: str = "last"


@st.composite
def stream_plan(draw) -> StreamPlan:
    plan = StreamPlan()
    if chance(draw, 0.25):
        how = draw(
            st.sampled_from(["drop", "second", "empty", "oversized", "none", "no end", "early end"])
        )
        at = draw(st.integers(0, 6))
        if how == "drop":
            plan.drop_header = True
        elif how == "second":
            plan.second_header_at = at + 1
        elif how == "empty":
            plan.empty_item_at = at + 1
        elif how == "oversized":
            plan.oversized_at = at
        elif how == "no end":
            plan.end = "missing"
        elif how == "early end":
            plan.end = "early"
        else:
            plan.no_messages = True
    return plan


@st.composite
def tensor_stream(draw, body: st.SearchStrategy[Tensors], *, max_mutations: int = 3):
    """``(headers, chunks, plan, n_mutations)`` of a possibly malformed tensor stream."""
    t = draw(body)
    mutations = min(max_mutations, draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3])))
    chunk_level = 0
    for _ in range(mutations):
        if t.headers and draw(st.booleans()):
            mutate = draw(st.sampled_from(HEADER_MUTATIONS))
            mutate(draw, t, draw(st.integers(0, len(t.headers) - 1)))
        else:
            chunk_level += 1
    small = sum(len(p) for p in t.payloads) <= 2048  # few messages even for tiny chunks
    chunk_bytes = draw(st.sampled_from([1 << 14, 7, 64])) if small else 1 << 14
    chunks = spec.chunks(t.payloads, chunk_bytes)
    for _ in range(chunk_level):
        _chunk_mutation(draw, chunks, len(t.headers))
    plan = draw(stream_plan()) if max_mutations else StreamPlan()
    return t.headers, chunks, plan, mutations


def assemble(wrapper: Any, header: Any, chunks: list[tpb.TensorChunk], plan: StreamPlan) -> list:
    """The messages of a stream: ``wrapper(header=...)`` then ``wrapper(chunk=...)`` items."""
    if plan.no_messages:
        return []
    items = [] if plan.drop_header else [wrapper(header=header)]
    items += [wrapper(chunk=c) for c in chunks]
    if plan.second_header_at is not None:
        items.insert(min(plan.second_header_at, len(items)), wrapper(header=header))
    if plan.empty_item_at is not None:
        items.insert(min(plan.empty_item_at, len(items)), wrapper())
    if plan.oversized_at is not None:
        big = tpb.TensorChunk(tensor=0, offset=0, data=b"\0" * OVERSIZED)
        items.insert(min(plan.oversized_at, len(items)), wrapper(chunk=big))
    end = wrapper(end=tpb.StreamEnd())
    if plan.end == "last":
        items.append(end)
    elif plan.end == "early" and items:
        items.insert(len(items) - 1, end)
    return items
