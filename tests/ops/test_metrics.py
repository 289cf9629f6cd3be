"""The Prometheus endpoint of a real server process: every family the issue names is exposed and
moves when the matching thing happens (sync rounds, duplicates, errors, snapshots, staleness)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from paramserve.v1 import parameter_server_pb2 as pb
from tests.support.models.tiny import grads_for, initial_variables
from tests.support.processes import free_port, scrape
from tests.support.wire import create_model_requests, push_requests, read_stream

PUSH_BYTES = 6 * 4 + 2 * 4  # the two float32 gradients of grads_for()


def _push(stub, **kwargs) -> pb.PushResponse:
    return stub.Push(iter(push_requests(grads_for(), **kwargs)), timeout=20)


def _push_error(stub, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _push(stub, **kwargs)
    return info.value.code()


def test_sync_server_metrics_cover_every_family(start_process, tmp_path):
    port = free_port()
    # A round deadline that two concurrent pushes cannot miss, however busy the machine: the
    # rounds here are full (a partial round is the next test's, with no race to lose).
    server = start_process(
        "--mode", "sync", "--replicas", "2", "--round-timeout-s", "600",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-port", str(port),
    )  # fmt: skip
    assert server.metrics_port == port
    before = scrape(port)
    assert before["paramserve_serving"] == 1 and before["paramserve_model_version"] == 0
    with server.channel() as channel, ThreadPoolExecutor(2) as pool:
        stub = server.stub(channel)
        stub.CreateModel(create_model_requests(initial_variables()), timeout=20)
        # A full round of two workers (version 1), then a retry of one of its pushes.
        rounds = [pool.submit(_push, stub, worker_id=w) for w in ("a", "b")]
        assert [r.result().version for r in rounds] == [1, 1]
        assert _push(stub, worker_id="a").duplicate
        # Worker b pushes gradients of version 0 into the round for version 1: stale. And a
        # malformed push is refused.
        stale = _push_error(stub, worker_id="b", sequence=2, base_version=0)
        assert stale == grpc.StatusCode.FAILED_PRECONDITION
        bad = {"w": np.zeros((3, 2), np.float32)}
        with pytest.raises(grpc.RpcError) as malformed:
            stub.Push(iter(push_requests(bad, worker_id="c")), timeout=20)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        version, _ = read_stream(stub.Pull(pb.PullRequest(), timeout=20))
        assert version == 1
        snapshot = stub.CreateSnapshot(pb.CreateSnapshotRequest(), timeout=20)

    m = scrape(port)
    pushes = {k: v for k, v in m.items() if k.startswith("paramserve_pushes_total")}
    assert pushes == {
        'paramserve_pushes_total{outcome="applied"}': 2,
        'paramserve_pushes_total{outcome="duplicate"}': 1,
        'paramserve_pushes_total{outcome="failed_precondition"}': 1,
        'paramserve_pushes_total{outcome="invalid_argument"}': 1,
    }
    assert m['paramserve_pulls_total{outcome="ok"}'] == 1
    assert m["paramserve_dedupe_hits_total"] == 1
    # Bytes in: the 4 pushes that got past validation; out: the pull.
    assert m['paramserve_received_bytes_total{method="Push"}'] == 4 * PUSH_BYTES
    assert m['paramserve_received_bytes_total{method="CreateModel"}'] == PUSH_BYTES
    assert m['paramserve_sent_bytes_total{method="Pull"}'] == PUSH_BYTES
    assert m["paramserve_apply_seconds_count"] == 1  # one apply per round
    assert m["paramserve_apply_seconds_sum"] > 0
    assert m["paramserve_round_wait_seconds_count"] >= 3
    assert m["paramserve_push_staleness_count"] >= 3
    assert m['paramserve_rounds_total{outcome="full"}'] == 1
    assert m.get('paramserve_rounds_total{outcome="partial"}', 0) == 0
    assert m['paramserve_snapshots_total{outcome="ok",trigger="rpc"}'] == 1
    assert m["paramserve_snapshot_seconds_count"] == 1
    assert m["paramserve_snapshot_seconds_sum"] > 0
    assert m["paramserve_snapshot_size_bytes"] == snapshot.size_bytes > 0
    assert m["paramserve_model_version"] == 1
    assert m['paramserve_rpcs_total{code="OK",method="CreateSnapshot"}'] == 1
    assert m['paramserve_rpcs_total{code="INVALID_ARGUMENT",method="Push"}'] == 1
    assert server.stop() == 0


def test_a_round_closed_at_its_deadline_counts_as_partial(start_process):
    port = free_port()
    server = start_process(
        "--mode", "sync", "--replicas", "2", "--round-timeout-s", "1",
        "--metrics-port", str(port),
    )  # fmt: skip
    with server.channel() as channel:
        stub = server.stub(channel)
        stub.CreateModel(create_model_requests(initial_variables()), timeout=20)
        # Worker a alone (nobody else pushes: nothing to race): the round closes partially at
        # its 1 s deadline.
        assert _push(stub, worker_id="a").version == 1
    m = scrape(port)
    assert m['paramserve_rounds_total{outcome="partial"}'] == 1
    assert m.get('paramserve_rounds_total{outcome="full"}', 0) == 0
    assert m['paramserve_pushes_total{outcome="applied"}'] == 1
    # Round wait: the push waited out the 1 s deadline (a slower machine only waits longer).
    assert m["paramserve_round_wait_seconds_count"] == 1
    assert m["paramserve_round_wait_seconds_sum"] >= 1.0
    assert m['paramserve_round_wait_seconds_bucket{le="0.5"}'] == 0
    assert m['paramserve_round_wait_seconds_bucket{le="+Inf"}'] == 1
    assert m["paramserve_model_version"] == 1
    assert server.stop() == 0


def test_stale_mode_records_staleness(start_process):
    port = free_port()
    server = start_process("--mode", "stale", "--max-staleness", "8", "--metrics-port", str(port))
    with server.channel() as channel:
        stub = server.stub(channel)
        stub.CreateModel(create_model_requests(initial_variables()), timeout=20)
        for sequence in range(1, 5):  # all computed from version 0: staleness 0, 1, 2, 3
            assert _push(stub, sequence=sequence, base_version=0).version == sequence
    m = scrape(port)
    assert m["paramserve_push_staleness_count"] == 4
    assert m["paramserve_push_staleness_sum"] == 0 + 1 + 2 + 3
    assert m['paramserve_push_staleness_bucket{le="0.0"}'] == 1
    assert m['paramserve_pushes_total{outcome="applied"}'] == 4
    assert m["paramserve_apply_seconds_count"] == 4
    assert not any(k.startswith("paramserve_rounds_total") for k in m)  # no sync rounds
    assert server.stop() == 0
