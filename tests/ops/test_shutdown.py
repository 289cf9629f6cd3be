"""SIGTERM and SIGINT against real server processes kept busy by waiting calls.

What tests/transport/test_services.py already covers (SIGTERM exit 0 with a final snapshot of
an idle server; NOT_SERVING on ``stop()``) is not repeated: these tests drain a *busy* server
(an open sync round, a min_version pull, an open health Watch), check what every waiting
caller is told, what a new push gets during the drain, and that the drain is bounded.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from paramserve.server.app import create_server
from paramserve.server.config import ServerConfig
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from tests.support.models.tiny import grads_for, initial_variables
from tests.support.processes import clean_env, free_port, scrape
from tests.support.wire import create_model_requests, push_requests, read_stream

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The "bounded time", as a hang guard: a drain takes well under a second, while one
# that waited for its calls would run to their deadlines (minutes) or to a long grace period.
# No assertion here depends on how fast the machine is.
EXIT_BOUND_S = 60.0
LONG_GRACE_S = "300"  # a drain that waited for its grace period would overrun EXIT_BOUND_S
HOLD_DEADLINE_S = 240.0  # the held stream's own deadline: far beyond EXIT_BOUND_S
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _snapshot_versions(directory: Path) -> list[int]:
    return sorted(int(p.name[5:17]) for p in directory.glob("snap-*.safetensors"))


def _wait_pending(stub, count: int) -> None:
    deadline = time.monotonic() + 60
    while stub.GetStatus(pb.GetStatusRequest(), timeout=30).pending_pushes != count:
        assert time.monotonic() < deadline, "the push never reached the round"
        time.sleep(0.02)


def _pull_in_background(stub, **request) -> tuple[threading.Thread, list]:
    """Start a Pull; the list gets ``("ok", version)`` or ``("error", RpcError)``."""
    outcome: list = []

    def run() -> None:
        try:
            version, _ = read_stream(stub.Pull(pb.PullRequest(**request), timeout=HOLD_DEADLINE_S))
            outcome.append(("ok", version))
        except grpc.RpcError as exc:
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _probe(address: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "paramserve.server.healthcheck", "--address", address],
        env=clean_env(),
        capture_output=True,
        timeout=30,
    ).returncode


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_a_busy_server(start_process, tmp_path, signum):
    ckpt = tmp_path / "ckpt"
    server = start_process(
        "--mode", "sync", "--replicas", "2", "--round-timeout-s", "600",
        "--checkpoint-dir", str(ckpt), "--grace-s", LONG_GRACE_S,
    )  # fmt: skip
    with server.channel() as channel:
        stub = server.stub(channel)
        stub.CreateModel(create_model_requests(initial_variables()), timeout=20)
        # Busy: worker a waits in the open round for a second worker, a pull waits for v1.
        waiting_push = stub.Push.future(
            iter(push_requests(grads_for(), worker_id="a")), timeout=HOLD_DEADLINE_S
        )
        _wait_pending(stub, 1)
        pull_thread, pull_outcome = _pull_in_background(stub, min_version=1)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        statuses = [next(watch).status]
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING

        server.send_signal(signum)
        statuses += [r.status for r in watch]  # the stream ends once the drain is done
        assert statuses == [SERVING, NOT_SERVING]

        # A push sent after NOT_SERVING was announced is refused, never applied.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Push(iter(push_requests(grads_for(), worker_id="b")), timeout=30)
        assert refused.value.code() == UNAVAILABLE, refused.value.details()

        # Every waiting caller gets a definite answer instead of hanging.
        error = waiting_push.exception(timeout=EXIT_BOUND_S)
        assert error is not None and error.code() == UNAVAILABLE
        assert "shutting down" in error.details()
        pull_thread.join(EXIT_BOUND_S)
        assert pull_outcome and pull_outcome[0][0] == "error", pull_outcome
        assert pull_outcome[0][1].code() == UNAVAILABLE

    assert server.wait(EXIT_BOUND_S) == 0, server.stderr  # the calls did not hold the drain
    # The aborted round was not applied: the final snapshot holds version 0, and a client
    # that retries the push after a restart (--resume) gets it applied exactly once.
    assert _snapshot_versions(ckpt) == [0]
    name = signal.Signals(signum).name
    assert server.wait_for_event("signal")["signal"] == name
    assert server.wait_for_event("stopped")["shutdown_s"] < EXIT_BOUND_S
    assert not [e for e in server.events if e["level"] in ("error", "critical")]


def test_a_round_in_flight_at_the_signal_completes_or_aborts_as_a_whole(start_process, tmp_path):
    ckpt = tmp_path / "ckpt"
    server = start_process(
        "--mode", "sync", "--replicas", "2", "--round-timeout-s", "60",
        "--checkpoint-dir", str(ckpt),
    )  # fmt: skip
    with server.channel() as channel, ThreadPoolExecutor(2) as pool:
        stub = server.stub(channel)
        stub.CreateModel(create_model_requests(initial_variables()), timeout=20)

        def push(worker: str):
            try:
                response = stub.Push(iter(push_requests(grads_for(), worker_id=worker)), timeout=60)
                return ("ok", response.version)
            except grpc.RpcError as exc:
                return (exc.code().name, None)

        first = pool.submit(push, "a")
        _wait_pending(stub, 1)
        second = pool.submit(push, "b")  # races the signal: the round closes, or it aborts
        server.send_signal(signal.SIGINT)
        outcomes = (first.result(EXIT_BOUND_S), second.result(EXIT_BOUND_S))
    assert server.wait(EXIT_BOUND_S) == 0, server.stderr
    if set(outcomes) == {("ok", 1)}:
        assert _snapshot_versions(ckpt) == [1]  # both applied in one step, then snapshotted
    else:
        # The pending push's round is aborted. The racing one is refused, or, when it reached
        # gRPC only as the server stopped listening (a busy machine), cancelled by gRPC
        # before any handler saw it; either way it was not applied.
        assert outcomes[0] == ("UNAVAILABLE", None), outcomes
        assert outcomes[1] in {("UNAVAILABLE", None), ("CANCELLED", None)}, outcomes
        assert _snapshot_versions(ckpt) == [0]  # neither applied


class _HeldStream:
    """A bidirectional reflection stream the server cannot finish until ``release.set()``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.release = threading.Event()
        self.answered = threading.Event()  # the server answered the first request
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            self.release.wait()

        responses = stub.ServerReflectionInfo(requests(), timeout=HOLD_DEADLINE_S)

        def consume() -> None:
            try:
                for _ in responses:
                    self.answered.set()
            except grpc.RpcError as exc:
                self.error = exc
            finally:
                self.ended.set()

        threading.Thread(target=consume, daemon=True).start()
        # Not merely handed to the client library: the server has the call and answered it,
        # so it is in flight there when the test signals (it never ends by itself).
        self.answered.wait(EXIT_BOUND_S)
        assert self.answered.is_set() and not self.ended.is_set(), self.error


def test_drain_is_bounded_by_the_grace_period(start_process):
    server = start_process("--grace-s", "1", "--no-snapshot-on-exit")
    with server.channel() as channel:
        held = _HeldStream(channel)  # a call in flight that would never end by itself
        try:
            server.send_signal(signal.SIGTERM)
            # The drain gives the call its grace period, then cuts it: the server exits long
            # before the call's own deadline (HOLD_DEADLINE_S).
            assert server.wait(EXIT_BOUND_S) == 0, server.stderr
            assert held.ended.wait(EXIT_BOUND_S)
            # Cut short ("Cancelling all calls"), not finished.
            assert held.error is not None and held.error.code() == UNAVAILABLE, held.error
        finally:
            held.release.set()
    # The server's own measure, from the start of the drain to its end: at least the grace
    # period, since the held call was in flight throughout (a slower machine only makes it
    # longer); the upper bound is a hang guard.
    assert 0.9 <= server.wait_for_event("stopped")["shutdown_s"] < EXIT_BOUND_S


def test_a_second_signal_exits_at_once(start_process):
    # The grace period outlasts EXIT_BOUND_S: only the forced exit can end the process in time.
    server = start_process("--grace-s", LONG_GRACE_S, "--no-snapshot-on-exit")
    with server.channel() as channel:
        held = _HeldStream(channel)
        try:
            server.send_signal(signal.SIGINT)
            server.wait_for_event("shutdown_started")
            server.send_signal(signal.SIGINT)
            assert server.wait(EXIT_BOUND_S) == 1  # not 0: the drain did not finish
        finally:
            held.release.set()
    assert server.wait_for_event("forced_exit")["signal"] == "SIGINT"
    assert not [e for e in server.events if e.get("event") == "stopped"]


def test_during_the_drain_health_checks_answer_not_serving_and_pushes_are_refused(tmp_path):
    """The drain window held open (final snapshot paused): Check, probe, Push, status, metrics."""
    config = ServerConfig(
        port=0, checkpoint_dir=tmp_path / "ckpt", metrics_port=free_port()
    ).replace(mode="async")
    server = create_server(config)
    in_snapshot, finish = threading.Event(), threading.Event()
    take_snapshot = server.core.take_snapshot

    def paused_snapshot(*, trigger: str):
        in_snapshot.set()
        assert finish.wait(30)
        return take_snapshot(trigger=trigger)

    server.core.take_snapshot = paused_snapshot  # type: ignore[method-assign]
    stopper = threading.Thread(target=server.stop, args=(5.0,))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            stub.CreateModel(create_model_requests(initial_variables()), timeout=20)
            stub.Push(iter(push_requests(grads_for())), timeout=20)
            assert scrape(server.metrics_port)["paramserve_serving"] == 1
            stopper.start()
            assert in_snapshot.wait(10)
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "paramserve.v1.ParameterServer"):
                request = health_pb2.HealthCheckRequest(service=service)
                assert health.Check(request, timeout=5).status == NOT_SERVING
            assert _probe(server.address) == 1
            with pytest.raises(grpc.RpcError) as refused:
                stub.Push(iter(push_requests(grads_for(), sequence=2)), timeout=5)
            assert refused.value.code() == UNAVAILABLE
            assert "shutting down" in refused.value.details()
            status = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
            assert not status.serving and status.version == 1
            metrics = scrape(server.metrics_port)
            assert metrics["paramserve_serving"] == 0
            assert metrics['paramserve_pushes_total{outcome="unavailable"}'] == 1
    finally:
        finish.set()
        if stopper.is_alive():
            stopper.join(30)
        server.stop(0)  # no-op once stopped
    assert server.wait(0)
    assert _snapshot_versions(tmp_path / "ckpt") == [1]
