"""Every error of the design's table that the daemon produces, against a real server.

Each test sends raw generated-stub requests (no SDK), checks the status code and that the
message says what was wrong, then that the server still serves with its state unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import grpc
import numpy as np
import pytest

from paramserve import wire
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.asserts import expect_error
from tests.support.models.tiny import grads_for, initial_variables
from tests.support.waiting import count_waiters, wait_until
from tests.support.wire import TIMEOUT_S, push_requests

# A drain's grace period that outlasts TIMEOUT_S: a waiting call released by the drain itself
# returns at once, one left to the end of the grace period would make the test fail.
LONG_GRACE_S = 60.0

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _raw_push(harness, items):
    return lambda: harness.stub.Push(iter(items), timeout=TIMEOUT_S)


# -- INVALID_ARGUMENT ----------------------------------------------------------------------


def test_malformed_tensor_header(harness):
    before = harness.state()
    header = wire.header_for("w", grads_for()["w"])
    header.dtype = 99
    items = push_requests({"w": grads_for()["w"]}, headers=[header])
    expect_error(INVALID, _raw_push(harness, items), match="dtype")
    harness.assert_unchanged(before)


def test_shape_mismatch(harness):
    before = harness.state()
    grads = {"w": np.ones((3, 2), np.float32)}
    details = expect_error(INVALID, lambda: harness.push(grads), match="shape")
    assert "[3, 2]" in details and "[2, 3]" in details  # what arrived and what was expected
    harness.assert_unchanged(before)


def test_dtype_mismatch(harness):
    before = harness.state()
    details = expect_error(
        INVALID, lambda: harness.push({"w": np.ones((2, 3), np.float64)}), match="dtype"
    )
    assert "float64" in details and "float32" in details
    harness.assert_unchanged(before)


def test_byte_length_mismatch(harness):
    before = harness.state()
    grad = grads_for()["w"]
    header = wire.header_for("w", grad)
    header.byte_length -= 4
    items = push_requests({"w": grad}, headers=[header])
    expect_error(INVALID, _raw_push(harness, items), match="byte_length")
    harness.assert_unchanged(before)


def test_unknown_hyperparameter(harness):
    before = harness.state()
    request = pb.SetHyperparametersRequest(values={"no_such_option": 1.0})
    expect_error(INVALID, lambda: harness.stub.SetHyperparameters(request, timeout=TIMEOUT_S))
    harness.assert_unchanged(before)


def test_unknown_pull_scope(harness):
    before = harness.state()
    expect_error(INVALID, lambda: harness.pull(scope=7), match="scope")
    harness.assert_unchanged(before)


@pytest.mark.parametrize(
    "optimizer_json, match",
    [
        ("{not json", "json"),
        ("[1, 2]", "dict"),
        (json.dumps({"class_name": "SGD", "config": {"no_such_option": 1}}), ""),
    ],
)
def test_bad_optimizer_definition(start_server, optimizer_json, match):
    h = start_server()
    expect_error(INVALID, lambda: h.create(optimizer_json=optimizer_json), match=match)
    expect_error(NOT_FOUND, lambda: h.stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S))
    h.create()  # still serves: a good definition is accepted afterwards
    assert h.state()[0] == 0


def test_first_stream_message_not_header(harness):
    before = harness.state()
    items = push_requests(grads_for())
    expect_error(INVALID, _raw_push(harness, items[1:]), match="header")
    expect_error(INVALID, _raw_push(harness, []), match="empty stream")
    harness.assert_unchanged(before)


def test_second_header_in_stream(harness):
    before = harness.state()
    items = push_requests(grads_for())
    expect_error(INVALID, _raw_push(harness, [items[0], items[0], *items[1:]]), match="chunks")
    harness.assert_unchanged(before)


def test_chunks_out_of_order(harness):
    before = harness.state()
    items = push_requests(grads_for())
    skipped = pb.PushRequest(chunk=tpb.TensorChunk(tensor=0, offset=8, data=b"\0" * 16))
    expect_error(INVALID, _raw_push(harness, [items[0], skipped]), match="offset")
    # Tensor 1 first, then tensor 0: tensor 0 was skipped.
    swapped = [items[0], items[2], items[1]]
    expect_error(INVALID, _raw_push(harness, swapped), match="ended early")
    harness.assert_unchanged(before)


def test_stream_ends_early(harness):
    before = harness.state()
    items = push_requests(grads_for())
    expect_error(INVALID, _raw_push(harness, items[:2]), match="ended early")
    truncated = pb.PushRequest(chunk=tpb.TensorChunk(tensor=0, offset=0, data=b"\0" * 8))
    expect_error(INVALID, _raw_push(harness, [items[0], truncated]), match="ended early")
    harness.assert_unchanged(before)


def test_a_stream_without_its_end_item_changes_nothing(harness):
    """Every payload byte arrived, but not the end item: the client may not be done."""
    before = harness.state()
    items = push_requests(grads_for())
    assert items[-1].WhichOneof("item") == "end"
    expect_error(INVALID, _raw_push(harness, items[:-1]), match="without its end item")
    expect_error(INVALID, _raw_push(harness, [*items, items[1]]), match="follow the end item")
    early = [items[0], items[-1], *items[1:-1]]
    expect_error(INVALID, _raw_push(harness, early), match="follow the end item")
    harness.assert_unchanged(before)
    harness.stub.Push(iter(items), timeout=TIMEOUT_S)  # the whole stream is applied
    assert harness.state()[0] == before[0] + 1


def test_nonfinite_gradient_rejected(harness):
    before = harness.state()
    grads = grads_for()
    grads["b"][1] = np.nan
    expect_error(INVALID, lambda: harness.push(grads), match="b")
    harness.assert_unchanged(before)


def test_sparse_row_out_of_range(harness):
    before = harness.state()
    rows = wire.SparseRows(np.array([5], np.int64), np.ones((1, 3), np.float32))
    header = wire.sparse_header("w", rows, (2, 3))
    expect_error(INVALID, lambda: harness.push({"w": rows}, headers=[header]))
    harness.assert_unchanged(before)


def test_bad_worker_identity(harness):
    before = harness.state()
    expect_error(INVALID, lambda: harness.push(grads_for(), worker_id=""))
    expect_error(INVALID, lambda: harness.push(grads_for(), sequence=0))
    harness.assert_unchanged(before)


def _upload(h, size_bytes: int, pieces: list[tuple[int, bytes]]):
    items = [pb.UploadSnapshotRequest(header=pb.UploadSnapshotHeader(size_bytes=size_bytes))]
    items += [
        pb.UploadSnapshotRequest(chunk=pb.FileChunk(offset=offset, data=data))
        for offset, data in pieces
    ]
    items.append(pb.UploadSnapshotRequest(end=tpb.StreamEnd()))
    return lambda: h.stub.UploadSnapshot(iter(items), timeout=TIMEOUT_S)


def test_bad_snapshot_upload(start_server, tmp_path):
    h = start_server(checkpoint_dir=tmp_path / "ckpt")
    h.create()
    info = h.stub.CreateSnapshot(pb.CreateSnapshotRequest(), timeout=TIMEOUT_S)
    data = (tmp_path / "ckpt" / f"{info.id}.safetensors").read_bytes()
    h.push(grads_for())
    before = h.state()
    half = len(data) // 2
    expect_error(INVALID, _upload(h, len(data), [(0, data[:half])]), match="ended early")
    expect_error(INVALID, _upload(h, len(data), [(0, data[:half]), (half + 1, data[half:])]))
    expect_error(INVALID, _upload(h, 10, [(0, data[:20])]), match="declared")
    expect_error(INVALID, _upload(h, len(data), [(0, b"\0" * len(data))]))
    listed = h.stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=TIMEOUT_S).snapshots
    assert [s.id for s in listed] == [info.id]  # nothing half-written was kept
    h.assert_unchanged(before)


# -- NOT_FOUND -----------------------------------------------------------------------------


def test_unknown_variable(harness):
    before = harness.state()
    grads = {"nope": np.ones(2, np.float32)}
    expect_error(NOT_FOUND, lambda: harness.push(grads), match="nope")
    expect_error(NOT_FOUND, lambda: harness.pull(names=["nope"]), match="nope")
    harness.assert_unchanged(before)


def test_unknown_snapshot(start_server, tmp_path):
    h = start_server(checkpoint_dir=tmp_path / "ckpt")
    h.create()
    before = h.state()
    bogus = "snap-000000000042-20260101T000000000000Z"
    request = pb.RestoreSnapshotRequest(id=bogus)
    expect_error(NOT_FOUND, lambda: h.stub.RestoreSnapshot(request, timeout=TIMEOUT_S))
    download = pb.DownloadSnapshotRequest(id=bogus)
    expect_error(NOT_FOUND, lambda: list(h.stub.DownloadSnapshot(download, timeout=TIMEOUT_S)))
    h.assert_unchanged(before)


def test_no_model(start_server):
    h = start_server()
    expect_error(NOT_FOUND, lambda: h.stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S))
    expect_error(NOT_FOUND, lambda: h.pull(), match="model")
    expect_error(NOT_FOUND, lambda: h.push(grads_for()), match="model")
    expect_error(NOT_FOUND, lambda: h.stub.DeleteModel(pb.DeleteModelRequest(), timeout=TIMEOUT_S))
    status = h.stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S)
    assert not status.has_model and status.serving


# -- ALREADY_EXISTS ------------------------------------------------------------------------


def test_conflicting_create(harness):
    before = harness.state()
    variables = initial_variables()
    variables["w"] = np.zeros((3, 3), np.float32)
    expect_error(grpc.StatusCode.ALREADY_EXISTS, lambda: harness.create(variables))
    assert harness.create().created is False  # the identical definition is a no-op
    harness.assert_unchanged(before)


# -- FAILED_PRECONDITION / ABORTED ---------------------------------------------------------


def test_stale_push(start_server):
    h = start_server(mode="sync", replicas=1)
    h.create()
    assert h.push(grads_for(), base_version=0).version == 1
    before = h.state()
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: h.push(grads_for(), sequence=2, base_version=0),
        match="version",
    )
    h.assert_unchanged(before)


def _push_in_thread(h, results, grads, **kwargs):
    def run():
        try:
            results.append(h.push(grads, **kwargs))
        except grpc.RpcError as exc:
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_pending(h, count: int) -> None:
    deadline = time.monotonic() + 60
    while h.stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).pending_pushes < count:
        assert time.monotonic() < deadline, "push never reached the round"
        time.sleep(0.01)


def test_second_push_into_round(start_server):
    h = start_server(mode="sync", replicas=2, round_timeout_s=30.0)
    h.create()
    before = h.state()
    results: list = []
    first = _push_in_thread(h, results, grads_for(1.0), worker_id="a", sequence=1)
    _wait_pending(h, 1)
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: h.push(grads_for(100.0), worker_id="a", sequence=2),
    )
    h.assert_unchanged(before)  # the round is still open
    second = h.push(grads_for(2.0), worker_id="b", sequence=1)
    first.join(TIMEOUT_S)
    assert second.version == 1 and second.contributors == 2
    assert results[0].version == 1
    _, after = h.state()
    # SGD(0.5) on the sum of a's first push and b's push only.
    for name, value in after.items():
        expected = before[1][name] - np.float32(0.5) * (grads_for(1.0)[name] + grads_for(2.0)[name])
        np.testing.assert_array_equal(value, expected)


def test_aborted_round_can_be_retried(start_server):
    h = start_server(mode="sync", replicas=2, round_timeout_s=0.3, deadline_policy="abort")
    h.create()
    before = h.state()
    expect_error(grpc.StatusCode.ABORTED, lambda: h.push(grads_for(), worker_id="a"))
    h.assert_unchanged(before)
    # The next round must not be cut short because the second push came late on a busy
    # machine: give it a deadline nothing but a hang can miss.
    aggregator = h.server.core.aggregator
    aggregator.config = dataclasses.replace(aggregator.config, round_timeout_s=600.0)
    # The aborted sequence was not recorded: the same push is accepted, not a duplicate.
    results: list = []
    retry = _push_in_thread(h, results, grads_for(), worker_id="a", sequence=1)
    _wait_pending(h, 1)
    h.push(grads_for(), worker_id="b")
    retry.join(TIMEOUT_S)
    assert not results[0].duplicate and results[0].version == 1


def test_snapshots_disabled(harness):
    before = harness.state()
    details = expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: harness.stub.CreateSnapshot(pb.CreateSnapshotRequest(), timeout=TIMEOUT_S),
    )
    assert "--checkpoint-dir" in details
    harness.assert_unchanged(before)


# -- RESOURCE_EXHAUSTED --------------------------------------------------------------------


def test_tensor_over_limit(start_server):
    h = start_server(max_tensor_bytes=64)
    h.create()
    before = h.state()
    # 100 sparse rows of w would be 2000 bytes: refused from the header, before any payload.
    header = tpb.TensorHeader(
        name="w",
        dtype=tpb.FLOAT32,
        shape=[2, 3],
        layout=tpb.LAYOUT_SPARSE_ROWS,
        num_rows=100,
        byte_length=2000,
    )
    items = push_requests({}, headers=[header])
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, _raw_push(h, items), match="max_tensor_bytes")
    h.assert_unchanged(before)


def test_request_over_limit(start_server):
    h = start_server(max_request_bytes=40)
    h.create()  # 32 bytes of variables
    before = h.state()
    rows = wire.SparseRows(np.array([0, 1], np.int64), np.ones((2, 3), np.float32))
    grads = {"w": rows, "b": grads_for()["b"]}  # 40 + 8 bytes
    headers = [wire.sparse_header("w", rows, (2, 3)), wire.header_for("b", grads["b"])]
    details = expect_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: h.push(grads, headers=headers),
        match="max_request_bytes",
    )
    assert "48" in details
    h.assert_unchanged(before)


def test_a_complete_push_cut_by_an_oversized_message_changes_nothing(start_server):
    """gRPC ends the handler's stream cleanly when it refuses a message over the limit: the
    missing end item is what keeps the complete payload before it from being applied."""
    h = start_server(max_message_bytes=1 << 20)
    small = {"w": np.zeros(4, np.float32)}
    h.create(small)
    before = h.state()
    items = push_requests({"w": np.ones(4, np.float32)})
    oversized = pb.PushRequest(chunk=tpb.TensorChunk(data=bytes(2 << 20)))
    for _ in range(10):  # the refusal races the handler's read; no outcome may apply it
        stream = [*items[:-1], oversized, items[-1]]
        expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, _raw_push(h, stream))
    h.assert_unchanged(before)


def test_message_over_limit(start_server):
    h = start_server(max_message_bytes=1 << 20)
    big = {"big": np.zeros(1 << 19, np.float32)}  # 2 MiB
    h.create(big, chunk_bytes=256 << 10)
    before = h.state()
    # One 2 MiB chunk in a single message: refused by gRPC's receive limit.
    items = push_requests(big)
    items = [items[0], pb.PushRequest(chunk=tpb.TensorChunk(data=big["big"].tobytes())), items[-1]]
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, _raw_push(h, items))
    h.assert_unchanged(before)


# -- UNAVAILABLE ---------------------------------------------------------------------------


def test_pushes_refused_while_shutting_down(harness):
    before = harness.state()
    harness.server.core.accepting.clear()  # the first step of stop(), observed in isolation
    expect_error(
        grpc.StatusCode.UNAVAILABLE, lambda: harness.push(grads_for()), match="shutting down"
    )
    harness.assert_unchanged(before)  # pulls are still served while draining


def test_waiting_push_released_by_stop(start_server):
    h = start_server(mode="sync", replicas=2, round_timeout_s=30.0)
    h.create()
    results: list = []
    waiting = _push_in_thread(h, results, grads_for(), worker_id="a")
    _wait_pending(h, 1)
    stopper = threading.Thread(target=h.server.stop, args=(LONG_GRACE_S,), daemon=True)
    stopper.start()
    waiting.join(TIMEOUT_S)
    assert results, "the waiting push was not released"
    assert isinstance(results[0], grpc.RpcError)
    # Released by the drain ("shutting down"), not cancelled at the end of the grace period.
    assert results[0].code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in results[0].details()
    stopper.join(TIMEOUT_S)
    assert not stopper.is_alive()
    assert h.server.core.store.version == 0


def test_waiting_pull_released_by_stop(harness):
    waiting = count_waiters(harness.server.core.store)
    errors: list = []

    def wait_for_version_5():
        try:
            list(harness.stub.Pull(pb.PullRequest(min_version=5)))  # no deadline at all
        except grpc.RpcError as exc:
            errors.append(exc)

    puller = threading.Thread(target=wait_for_version_5, daemon=True)
    puller.start()
    wait_until(lambda: waiting() == 1)  # the pull waits on the server
    stopper = threading.Thread(target=harness.server.stop, args=(LONG_GRACE_S,), daemon=True)
    stopper.start()
    puller.join(TIMEOUT_S)
    assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in errors[0].details()  # released by the drain, not at its end
    stopper.join(TIMEOUT_S)
    assert not stopper.is_alive()


# -- INTERNAL and DEADLINE_EXCEEDED --------------------------------------------------------


def test_unexpected_error_is_internal_without_details(harness, monkeypatch, caplog):
    before = harness.state()

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(harness.server.core.store, "read_with", broken)
    details = expect_error(grpc.StatusCode.INTERNAL, lambda: harness.pull())
    assert details == "internal error"
    assert "secret internals" in caplog.text  # logged with its traceback on the server
    monkeypatch.undo()
    harness.assert_unchanged(before)


def test_pull_waits_for_version_within_deadline(harness):
    before = harness.state()
    request = pb.PullRequest(min_version=5)
    with pytest.raises(grpc.RpcError) as info:
        list(harness.stub.Pull(request, timeout=0.3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    harness.assert_unchanged(before)


# -- Step (push + pull in one message): the same checks, before anything changes ----------


def _step(harness, grads, *, names=(), rows=None, headers=None, sequence=1):
    headers = headers or [wire.header_for(n, v) for n, v in grads.items()]
    request = pb.StepRequest(
        push=pb.PushHeader(worker_id="w0", sequence=sequence, tensors=headers),
        gradients=[pb.InlineTensor(data=v.tobytes()) for v in grads.values()],
        pull=pb.PullRequest(
            names=list(names),
            rows=[pb.RowSelection(name=n, rows=r) for n, r in (rows or {}).items()],
        ),
    )
    return lambda: harness.stub.Step(request, timeout=TIMEOUT_S)


def test_step_errors_leave_state_unchanged(harness):
    before = harness.state()
    expect_error(INVALID, _step(harness, {"w": np.ones((3, 2), np.float32)}), match="shape")
    short = wire.header_for("b", grads_for()["b"])
    short.byte_length += 4
    expect_error(INVALID, _step(harness, {"b": grads_for()["b"]}, headers=[short]))
    expect_error(NOT_FOUND, _step(harness, grads_for(), names=["nope"]), match="nope")
    expect_error(INVALID, _step(harness, grads_for(), rows={"w": [2]}), match="rows")
    harness.assert_unchanged(before)
    response = _step(harness, grads_for())()
    assert response.push.applied and response.version == 1
    assert [t.header.name for t in response.weights] == ["w", "b"]


def test_step_reply_over_message_limit(start_server):
    h = start_server(max_message_bytes=256 << 10)
    big = {"big": np.zeros(1 << 17, np.float32), "b": np.zeros(2, np.float32)}  # 512 KiB
    h.create(big, chunk_bytes=64 << 10)
    before = h.state()
    expect_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        _step(h, {"b": np.ones(2, np.float32)}),
        match="max_message_bytes",
    )
    h.assert_unchanged(before)
    assert _step(h, {"b": np.ones(2, np.float32)}, names=["b"])().version == 1
