"""The bad inputs the fuzz suite found, pinned as plain tests against the same live servers.

Each one answered INTERNAL (or changed state it must not) before its fix.
"""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import wire
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from . import oracle, oracle_admin, spec
from .live import TIMEOUT_S, State
from .runner import run_case, sender

pytestmark = pytest.mark.slow


def _state_stream(arrays: dict[str, np.ndarray]) -> list[tpb.TensorStreamItem]:
    header = tpb.TensorStreamHeader(tensors=[spec.dense_header(k, v) for k, v in arrays.items()])
    chunks = spec.chunks([spec.payload_bytes(v) for v in arrays.values()], 1 << 14)
    return [
        tpb.TensorStreamItem(header=header),
        *(tpb.TensorStreamItem(chunk=c) for c in chunks),
        tpb.TensorStreamItem(end=tpb.StreamEnd()),
    ]


def test_empty_row_selection_is_served():
    """Zero sparse rows of a 2-D variable: memoryview could not cast the (0, 2) values."""
    rows = wire.SparseRows(np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    assert [len(v) for v in wire.payload_views(rows)] == [0, 0]


def test_pull_and_step_with_no_rows(servers):
    server = servers["allow"]
    request = pb.PullRequest(rows=[pb.RowSelection(name="embedding", rows=[])])

    def pull(state: State):
        return sender(server.stub.Pull, request, timeout=TIMEOUT_S), oracle.pull_verdict(
            request, state
        )

    run_case(server, "regression", pull)
    step = pb.StepRequest(
        push=pb.PushHeader(
            worker_id="regression", tensors=[spec.dense_header("scale", np.float32(1))]
        ),
        gradients=[pb.InlineTensor(data=np.float32(1).tobytes())],
        pull=request,
    )

    def step_case(state: State):
        step.push.sequence = state.workers.get("regression", (0, 0))[0] + 1
        verdict = oracle.step_verdict(step, state, server.nonfinite)
        return sender(server.stub.Step, step, timeout=TIMEOUT_S), verdict

    run_case(server, "regression", step_case)


@pytest.mark.parametrize(
    "method, kind, raw",
    [
        ("SetHyperparameters", "unary_unary", [b"\x0a\xff\xff"]),
        ("Describe", "unary_unary", [b"\x08"]),
        ("Push", "stream_unary", [b"\x0a\xff\xff"]),
        ("CreateModel", "stream_unary", [b"\x0a\x02\x0a\x01"]),
        ("Pull", "unary_stream", [b"\x12\x05\x0a\x03\xff\xfe\xfd"]),  # invalid UTF-8 name
    ],
)
def test_undecodable_requests_are_invalid_argument(servers, method, kind, raw):
    """gRPC answers a deserializer exception with INTERNAL and logs a traceback."""
    server = servers["reject"]
    call = server.raw(method, kind)
    argument = iter(raw) if kind == "stream_unary" else raw[0]

    def prepare(state: State):
        def send():
            reply = call(argument, timeout=TIMEOUT_S)
            return list(reply) if kind == "unary_stream" else reply

        return (lambda: _code(send)), oracle.fail(oracle.INVALID)

    run_case(server, "regression", prepare)
    server.assert_healthy()


def _code(send):
    from .live import call_code

    return call_code(send)


def test_deeply_nested_optimizer_json_is_invalid_argument(servers):
    """json.loads raises RecursionError, which the servicer did not catch."""
    server = servers["reject"]
    messages = spec.create_messages()
    messages[0].header.optimizer_json = "[" * 5000

    def prepare(state: State):
        verdict = oracle_admin.create_verdict(messages, state)
        assert verdict.codes == {oracle.INVALID}
        return sender(server.stub.CreateModel, iter(messages), timeout=TIMEOUT_S), verdict

    run_case(server, "regression", prepare)


def test_create_model_with_an_int64_overflowing_shape(servers):
    """[2**32, 2**32] float32 wraps to 0 bytes in int64 arithmetic: the header must not pass."""
    server = servers["reject"]
    header = tpb.TensorHeader(name="x", dtype=tpb.FLOAT32, shape=[2**32, 2**32], byte_length=0)
    messages = [
        pb.CreateModelRequest(header=pb.CreateModelHeader(variables=[header])),
        pb.CreateModelRequest(end=tpb.StreamEnd()),
    ]

    def prepare(state: State):
        verdict = oracle_admin.create_verdict(messages, state)
        return sender(server.stub.CreateModel, iter(messages), timeout=TIMEOUT_S), verdict

    run_case(server, "regression", prepare)


@pytest.mark.parametrize(
    "key, value",
    [
        ("iteration", np.array(-5, np.int32)),  # version -5: the next snapshot failed
        ("iteration", np.array(2**31 - 1, np.int32)),  # the next push overflowed
        ("learning_rate", np.array(np.nan, np.float32)),  # SetHyperparameters refuses NaN
    ],
)
def test_optimizer_state_counters_and_rate_are_checked(servers, key, value):
    server = servers["reject"]

    def prepare(state: State):
        arrays = {k: v.copy() for k, v in state.optimizer_state.items()}
        arrays[key] = value
        messages = _state_stream(arrays)
        verdict = oracle_admin.set_state_verdict(messages, state)
        assert verdict.codes == {oracle.INVALID}
        return sender(server.stub.SetOptimizerState, iter(messages), timeout=TIMEOUT_S), verdict

    run_case(server, "regression", prepare)
    info = server.stub.CreateSnapshot(pb.CreateSnapshotRequest(), timeout=TIMEOUT_S)
    assert info.version >= 0
    server.cached_state = None  # a new snapshot file


@pytest.mark.parametrize(
    "values, code",
    [
        ({"learning_rate": 1e39}, oracle.INVALID),  # finite, but inf in the float32 variable
        ({"momentum": 0.0}, oracle.PRECONDITION),  # SGD would drop its momentum slots
    ],
)
def test_hyperparameters_the_live_optimizer_cannot_take(servers, values, code):
    server = servers["skip"]
    request = pb.SetHyperparametersRequest(values=values)

    def prepare(state: State):
        verdict = oracle_admin.hyperparameters_verdict(dict(request.values), state)
        assert verdict.codes == {code}
        return sender(server.stub.SetHyperparameters, request, timeout=TIMEOUT_S), verdict

    run_case(server, "regression", prepare)
