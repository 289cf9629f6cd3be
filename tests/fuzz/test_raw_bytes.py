"""Raw bytes for every RPC: undecodable protobuf, bit flips and truncations of real requests.

Bytes that do not parse as the request message are INVALID_ARGUMENT; bytes that do are judged
by the same oracle as the structured families.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from . import oracle, oracle_admin, spec
from .live import TIMEOUT_S, State
from .runner import fuzz, run_case

pytestmark = pytest.mark.slow

_SCALE = np.array(0.25, np.float32)
_PUSH_HEADER = pb.PushHeader(
    worker_id="raw", sequence=1, tensors=[spec.dense_header("scale", _SCALE)]
)
_CHUNK = tpb.TensorChunk(data=_SCALE.tobytes())

# method -> (call kind, request message class, serialized seeds to mutate)
METHODS = {
    "Push": (
        "stream_unary",
        pb.PushRequest,
        [
            pb.PushRequest(header=_PUSH_HEADER),
            pb.PushRequest(chunk=_CHUNK),
            pb.PushRequest(end=tpb.StreamEnd()),
        ],
    ),
    "CreateModel": ("stream_unary", pb.CreateModelRequest, spec.create_messages()[:2]),
    "SetOptimizerState": (
        "stream_unary",
        tpb.TensorStreamItem,
        [tpb.TensorStreamItem(header=tpb.TensorStreamHeader(tensors=[_PUSH_HEADER.tensors[0]]))],
    ),
    "UploadSnapshot": (
        "stream_unary",
        pb.UploadSnapshotRequest,
        [pb.UploadSnapshotRequest(header=pb.UploadSnapshotHeader(size_bytes=4))],
    ),
    "Pull": (
        "unary_stream",
        pb.PullRequest,
        [
            pb.PullRequest(names=["scale"]),
            pb.PullRequest(rows=[pb.RowSelection(name="embedding", rows=[1, 2])]),
            pb.PullRequest(scope=pb.PULL_SCOPE_OPTIMIZER_STATE),
        ],
    ),
    "DownloadSnapshot": (
        "unary_stream",
        pb.DownloadSnapshotRequest,
        [pb.DownloadSnapshotRequest(id="snap-000000000001-20260101T000000000000Z")],
    ),
    "RestoreSnapshot": (
        "unary_unary",
        pb.RestoreSnapshotRequest,
        [pb.RestoreSnapshotRequest(id="../snap-000000000001-20260101T000000000000Z")],
    ),
    "SetHyperparameters": (
        "unary_unary",
        pb.SetHyperparametersRequest,
        [pb.SetHyperparametersRequest(values={"momentum": 0.5, "nope": 1.0})],
    ),
    "Step": (
        "unary_unary",
        pb.StepRequest,
        [pb.StepRequest(push=_PUSH_HEADER, gradients=[pb.InlineTensor(data=_SCALE.tobytes())])],
    ),
    "Describe": ("unary_unary", pb.DescribeRequest, [pb.DescribeRequest()]),
    "GetStatus": ("unary_unary", pb.GetStatusRequest, [pb.GetStatusRequest()]),
    "ListSnapshots": ("unary_unary", pb.ListSnapshotsRequest, [pb.ListSnapshotsRequest()]),
}


@st.composite
def raw_message(draw, seeds: list) -> bytes:
    how = draw(st.sampled_from(["random", "flip", "truncate", "append", "seed"]))
    if how == "random":
        return draw(st.binary(max_size=48))
    data = bytearray(draw(st.sampled_from(seeds)).SerializeToString())
    if how == "flip" and data:
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate" and data:
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@st.composite
def raw_requests(draw) -> tuple[str, list[bytes]]:
    method = draw(st.sampled_from(sorted(METHODS)))
    kind, _, seeds = METHODS[method]
    count = draw(st.integers(1, 3)) if kind == "stream_unary" else 1
    return method, [draw(raw_message(seeds)) for _ in range(count)]


def verdict_for(method: str, parsed: list, state: State, servers) -> oracle.Verdict:
    if method == "Push":
        return oracle.push_verdict(parsed, state, "reject")
    if method == "CreateModel":
        return oracle_admin.create_verdict(parsed, state)
    if method == "SetOptimizerState":
        return oracle_admin.set_state_verdict(parsed, state)
    if method == "UploadSnapshot":
        valid = {servers.snapshot_bytes: servers.snapshot_state}
        return oracle_admin.upload_verdict(parsed, enabled=True, valid_files=valid)
    if method == "Pull":
        return oracle.pull_verdict(parsed[0], state)
    if method == "Step":
        return oracle.step_verdict(parsed[0], state, "reject")
    if method == "SetHyperparameters":
        return oracle_admin.hyperparameters_verdict(dict(parsed[0].values), state)
    if method in ("RestoreSnapshot", "DownloadSnapshot"):
        assume(parsed[0].id not in state.snapshots)
        return oracle_admin.snapshot_id_verdict(
            parsed[0].id, enabled=True, existing=state.snapshots
        )
    return oracle.ok()  # Describe, GetStatus, ListSnapshots: unknown fields are ignored


def _decodable_prefix(messages: list[bytes], message_cls) -> list:
    """The parsed messages before the first one protobuf cannot decode."""
    out = []
    for raw in messages:
        parsed = oracle.parse_all([raw], message_cls)
        if parsed is None:
            break
        out += parsed
    return out


def _drain(reply):
    return list(reply) if not isinstance(reply, bytes) else reply


@fuzz(max_examples=120)
@given(request=raw_requests())
def test_raw_bytes(servers, request):
    method, messages = request
    server = servers["reject"]
    kind, message_cls, _ = METHODS[method]
    parsed = oracle.parse_all(messages, message_cls)
    call = server.raw(method, kind)

    def prepare(state: State):
        if parsed is None:
            verdict = oracle.fail(oracle.INVALID)  # undecodable: malformed, not internal
            decodable = _decodable_prefix(messages, message_cls)
            if kind == "stream_unary" and decodable:
                # The server may refuse the messages before the undecodable one first.
                before = verdict_for(method, decodable, state, servers)
                verdict = oracle.fail(oracle.INVALID, *before.codes)
        else:
            verdict = verdict_for(method, parsed, state, servers)
            if verdict.check_reply is not None:
                check, message = verdict.check_reply, _reply_class(method)
                verdict.check_reply = lambda reply: check(_parse_reply(reply, message))
        timeout = TIMEOUT_S
        if method == "Pull" and parsed is not None and parsed[0].min_version > state.version:
            timeout = 0.3
        argument = iter(messages) if kind == "stream_unary" else messages[0]

        def send():
            from .live import call_code

            return call_code(lambda: _drain(call(argument, timeout=timeout)))

        return send, verdict

    run_case(server, "raw_bytes", prepare)


def _reply_class(method: str):
    return {
        "Push": pb.PushResponse,
        "CreateModel": pb.CreateModelResponse,
        "Step": pb.StepResponse,
    }.get(method, tpb.TensorStreamItem)


def _parse_reply(reply, message_cls):
    if isinstance(reply, list):
        return [message_cls.FromString(r) for r in reply]
    return message_cls.FromString(reply)
