"""The expected outcome of any request, computed from the request and the server's state.

Each ``*_verdict`` reads the messages exactly as they go on the wire and applies the rules of
the design's error table and the proto comments: a message over ``max_message_bytes`` or a
request over a limit is RESOURCE_EXHAUSTED; a malformed tensor, shape, dtype, size, stream or
option is INVALID_ARGUMENT; an unknown variable or snapshot is NOT_FOUND; a model that exists
with another definition is ALREADY_EXISTS. When a request has several defects the server may
report any of them (the order of checks is not part of the contract), so a verdict holds the
*set* of codes each defect maps to; a request with one defect has exactly one acceptable code.
An accepted request comes with the state it must lead to, computed locally (pushes are
replayed with ``optim_core``), or with the reply it must get.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from paramserve import optim_core
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from . import spec
from .live import State

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

MAX_NAME_CHARS = 1024


@dataclass
class Verdict:
    """Acceptable error codes (empty: the call must succeed), else the state it leads to."""

    codes: frozenset[grpc.StatusCode] = frozenset()
    expect: Callable[[State], State] | None = None
    check_reply: Callable[[Any], None] | None = None

    @property
    def accepts(self) -> bool:
        return not self.codes


def fail(*codes: grpc.StatusCode) -> Verdict:
    assert codes
    return Verdict(codes=frozenset(codes))


def ok(expect=None, check_reply=None) -> Verdict:
    return Verdict(expect=expect, check_reply=check_reply)


def bad_name(name: str) -> bool:
    """Names the server refuses for models and variables: too long or with control chars."""
    return len(name) > MAX_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name)


# -- tensor streams ------------------------------------------------------------------------


@dataclass
class Stream:
    """A classified tensor stream: errors found, else the header and the decoded tensors."""

    codes: set[grpc.StatusCode] = field(default_factory=set)
    header: Any = None
    headers: list[tpb.TensorHeader] = field(default_factory=list)
    tensors: dict[str, Any] | None = None


def tensor_stream(
    messages: Sequence[Any],
    tensors_of: Callable[[Any], Iterable[tpb.TensorHeader]],
    *,
    known: dict[str, tuple[str, tuple[int, ...]]] | None,
    unknown_code: grpc.StatusCode,
    dense_only: bool,
    header_codes: Callable[[Any], set[grpc.StatusCode]] = lambda header: set(),
) -> Stream:
    """Header, limits and model checks, then the chunks in the documented strict order."""
    out = Stream()
    sizes = [m.ByteSize() for m in messages]
    over = next((i for i, s in enumerate(sizes) if s > spec.MAX_MESSAGE_BYTES), None)
    complete = over is None
    if over is not None:
        # gRPC refuses the message; the handler may have failed on what came before it.
        out.codes.add(EXHAUSTED)
        messages = messages[:over]
        if not messages:
            return out
    if not messages or messages[0].WhichOneof("item") != "header":
        out.codes.add(INVALID)
        return out
    out.header = messages[0].header
    headers = out.headers = list(tensors_of(out.header))
    if len(headers) > spec.MAX_VARIABLES:
        out.codes.add(EXHAUSTED)
        return out
    found: set[grpc.StatusCode] = set()
    seen: set[str] = set()
    total = 0
    for h in headers:
        if not h.name or h.name in seen:
            found.add(INVALID)
        seen.add(h.name)
        size = spec.payload_size(h)
        if size is None or size != h.byte_length:
            found.add(INVALID)
            continue
        if dense_only and h.layout != tpb.LAYOUT_DENSE:
            found.add(INVALID)
            continue
        if size > spec.MAX_TENSOR_BYTES:
            found.add(EXHAUSTED)
        total += size
        if known is not None and h.name:
            if h.name not in known:
                found.add(unknown_code)
            elif known[h.name] != (spec.DTYPES[h.dtype].name, tuple(h.shape)):
                found.add(INVALID)
    if total > spec.MAX_REQUEST_BYTES:
        found.add(EXHAUSTED)
    found |= header_codes(out.header)
    if found:
        out.codes |= found
        return out
    received = [b""] * len(headers)
    current = 0
    ended = False
    for m in messages[1:]:
        if ended or m.WhichOneof("item") not in ("chunk", "end"):
            out.codes.add(INVALID)  # a second header, an empty item, or an item after the end
            return out
        if m.WhichOneof("item") == "end":
            ended = True
            continue
        c = m.chunk
        if c.tensor >= len(headers) or c.tensor < current:
            out.codes.add(INVALID)
            return out
        if any(len(received[i]) != headers[i].byte_length for i in range(current, c.tensor)):
            out.codes.add(INVALID)  # a tensor before this one ended early
            return out
        current = c.tensor
        if c.offset != len(received[c.tensor]):
            out.codes.add(INVALID)  # out of order, repeated or skipped ahead
            return out
        if len(received[c.tensor]) + len(c.data) > headers[c.tensor].byte_length:
            out.codes.add(INVALID)  # longer than byte_length
            return out
        received[c.tensor] += c.data
    if any(len(r) != h.byte_length for r, h in zip(received, headers, strict=True)):
        if complete:
            out.codes.add(INVALID)  # the stream ended early
        return out
    if not complete:
        return out  # cut by the refused message before its end item: nothing changes
    if not ended:
        out.codes.add(INVALID)  # no end item: the server cannot know it got everything
        return out
    out.tensors = {h.name: spec.decode(h, r) for h, r in zip(headers, received, strict=True)}
    return out


# -- pushes --------------------------------------------------------------------------------


def replay(state: State, grads: dict[str, Any]) -> State:
    """``state`` after one optimizer step on ``grads``, computed locally with optim_core."""
    optimizer = optim_core.get(json.loads(state.optimizer_json))
    variables = {n: optim_core.Variable(w.copy(), path=n) for n, w in state.weights.items()}
    optimizer.build(list(variables.values()))
    optimizer.load_state_dict(state.optimizer_state)
    values = [
        optim_core.IndexedSlices(np.asarray(g.indices, np.int64), g.values.copy())
        if isinstance(g, spec.Rows)
        else g
        for g in grads.values()
    ]
    optimizer.apply(values, [variables[n] for n in grads])
    return state.evolve(
        version=optimizer.iterations,
        weights={n: v.numpy() for n, v in variables.items()},
        optimizer_state=optimizer.state_dict(),
    )


def push_verdict(messages: Sequence[pb.PushRequest], state: State, nonfinite: str) -> Verdict:
    stream = tensor_stream(
        messages,
        lambda header: header.tensors,
        known=spec.VARIABLES,
        unknown_code=NOT_FOUND,
        dense_only=False,
    )
    if stream.codes:
        return fail(*stream.codes)
    assert stream.tensors is not None
    return push_content(stream.header, stream.tensors, state, nonfinite)


def push_content(header: Any, grads: dict[str, Any], state: State, nonfinite: str) -> Verdict:
    """Identity, exactly-once, then the gradients themselves (structure before finiteness)."""
    worker, sequence = header.worker_id, header.sequence
    if not worker or sequence < 1:
        return fail(INVALID)
    last, pushes = state.workers.get(worker, (0, 0))
    if sequence <= last:  # a retry: acknowledged, never applied twice

        def is_duplicate(reply: pb.PushResponse) -> None:
            assert reply.duplicate, reply

        return ok(check_reply=is_duplicate)
    if not grads:
        return fail(INVALID)
    for name, grad in grads.items():
        if isinstance(grad, spec.Rows) and grad.indices.size:
            rows = spec.VARIABLES[name][1][0]  # sparse rows only get here for rank >= 1
            if grad.indices.min() < 0 or grad.indices.max() >= rows:
                return fail(INVALID)

    def record(s: State) -> State:
        return s.evolve(workers={**s.workers, worker: (sequence, pushes + 1)})

    values = [g.values if isinstance(g, spec.Rows) else g for g in grads.values()]
    if not all(np.isfinite(v).all() for v in values):
        if nonfinite == "reject":
            return fail(INVALID)
        if nonfinite == "skip":
            return ok(expect=record)  # acknowledged, dropped, sequence consumed
    return ok(expect=lambda s: record(replay(s, grads)))


def sized(request: Any, verdict: Verdict) -> Verdict:
    """A unary request over max_message_bytes never reaches the handler."""
    return fail(EXHAUSTED) if request.ByteSize() > spec.MAX_MESSAGE_BYTES else verdict


# -- pulls ---------------------------------------------------------------------------------


def pull_verdict(request: pb.PullRequest, state: State) -> Verdict:
    codes: set[grpc.StatusCode] = set()
    if request.min_version > state.version:
        codes.add(DEADLINE)  # waits for a version that never comes within the deadline
    if request.scope == pb.PULL_SCOPE_OPTIMIZER_STATE:
        if request.names or request.rows:
            codes.add(INVALID)
        if codes:
            return fail(*codes)
        return ok(check_reply=lambda reply: _same_tensors(reply, state, state.optimizer_state))
    if request.scope != pb.PULL_SCOPE_WEIGHTS:
        return fail(*codes, INVALID)
    codes |= selection_codes(request)
    if codes:
        return fail(*codes)
    expected = selected_weights(request, state)
    return ok(check_reply=lambda reply: _same_tensors(reply, state, expected))


def selection_codes(request: pb.PullRequest) -> set[grpc.StatusCode]:
    """Errors of a weights selection: rows selected twice, unknown names, bad rows."""
    codes: set[grpc.StatusCode] = set()
    selected = [r.name for r in request.rows]
    if len(set(selected)) != len(selected):
        codes.add(INVALID)
    if any(name not in spec.VARIABLES for name in [*request.names, *selected]):
        codes.add(NOT_FOUND)
    for r in request.rows:
        shape = spec.VARIABLES.get(r.name, (None, None))[1]
        if shape is not None and (not shape or any(not 0 <= i < shape[0] for i in r.rows)):
            codes.add(INVALID)
    return codes


def selected_weights(request: pb.PullRequest, state: State) -> dict[str, Any]:
    """What a valid weights selection returns, in the server's order."""
    rows = {r.name: list(r.rows) for r in request.rows}
    wanted = list(dict.fromkeys([*request.names, *rows])) or list(spec.VARIABLES)
    out: dict[str, Any] = {}
    for name in wanted:
        weights = state.weights[name]
        if name in rows:
            out[name] = spec.Rows(np.array(rows[name], np.int64), weights[rows[name]])
        else:
            out[name] = weights
    return out


def _same_tensors(reply: list[tpb.TensorStreamItem], state: State, expected: dict) -> None:
    from .live import read_tensor_stream

    version, tensors = read_tensor_stream(reply)
    assert version == state.version
    same_values(tensors, expected)


def same_values(tensors: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(tensors) == list(expected), (list(tensors), list(expected))
    for name, want in expected.items():
        got = tensors[name]
        if isinstance(want, spec.Rows):
            assert isinstance(got, spec.Rows)
            np.testing.assert_array_equal(got.indices, want.indices)
            got, want = got.values, want.values
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got, want)
        assert got.tobytes() == want.tobytes(), name


# -- Step ----------------------------------------------------------------------------------


def step_verdict(request: pb.StepRequest, state: State, nonfinite: str) -> Verdict:
    """Push's rules for the inline gradients, then the pull's selection; one message each way."""
    if request.ByteSize() > spec.MAX_MESSAGE_BYTES:
        return fail(EXHAUSTED)
    codes: set[grpc.StatusCode] = set()
    if request.pull.scope != pb.PULL_SCOPE_WEIGHTS:
        codes.add(INVALID)  # a Step returns weights only
    codes |= selection_codes(request.pull)
    headers = list(request.push.tensors)
    gradients = list(request.gradients)
    if len(gradients) != len(headers):
        codes.add(INVALID)
    elif any(
        g.HasField("header") and g.header != h for g, h in zip(gradients, headers, strict=True)
    ):
        codes.add(INVALID)  # an inline header must be unset or equal push.tensors[i]
    messages = [pb.PushRequest(header=request.push)]
    messages += [
        pb.PushRequest(chunk=tpb.TensorChunk(tensor=i, data=g.data))
        for i, g in enumerate(gradients[: len(headers)])
    ]
    messages.append(pb.PushRequest(end=tpb.StreamEnd()))  # the inline tensors are complete
    stream = tensor_stream(
        messages,
        lambda header: header.tensors,
        known=spec.VARIABLES,
        unknown_code=NOT_FOUND,
        dense_only=False,
    )
    codes |= stream.codes
    if codes:
        return fail(*codes)
    assert stream.tensors is not None
    push = push_content(request.push, stream.tensors, state, nonfinite)
    if not push.accepts:
        return push
    after = push.expect(state) if push.expect else state

    def check_reply(reply: pb.StepResponse) -> None:
        if push.check_reply is not None:
            push.check_reply(reply.push)
        assert reply.version == after.version, (reply.version, after.version)
        weights = {w.header.name: spec.decode(w.header, w.data) for w in reply.weights}
        same_values(weights, selected_weights(request.pull, after))

    return Verdict(expect=push.expect, check_reply=check_reply)


# -- raw bytes -----------------------------------------------------------------------------


def parse_all(messages: Sequence[bytes], message_cls: Any) -> list[Any] | None:
    """The messages as the server's deserializer sees them; None if any does not parse."""
    try:
        return [message_cls.FromString(raw) for raw in messages]
    except DecodeError:
        return None
