"""Training through real servers and worker processes matches optim_core replays bit for bit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from paramserve.client import Client
from tests.support.asserts import assert_same
from tests.support.models.embedding import initial_weights, known_gradients
from tests.support.replay import LocalModel, combine
from tests.support.workers import async_worker, stale_worker, sync_worker

# Submitted in an order that is not the sorted order, so the test sees the sort.
WORKERS = ("worker-c", "worker-a", "worker-b")
OPTIMIZER = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


def run_sync(pool, address: str, first_step: int, steps: int) -> list[dict]:
    futures = [pool.submit(sync_worker, address, w, first_step, steps) for w in WORKERS]
    return [f.result(timeout=60) for f in futures]


def replay_sync(model: LocalModel, steps: int, *, reduction: str, first_step: int = 0) -> None:
    for step in range(first_step, first_step + steps):
        weights = model.weights()
        pushes = [known_gradients(w, step, weights) for w in sorted(WORKERS)]
        model.apply(combine(pushes, reduction=reduction))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sync_rounds_equal_local_sum_of_sorted_pushes(
    start_server, connect, worker_pool, reduction
):
    server = start_server(mode="sync", replicas=3, reduction=reduction)
    admin = connect(server)
    admin.create_model(initial_weights(), OPTIMIZER)
    finals = run_sync(worker_pool, server.address, 0, 4)

    model = LocalModel(initial_weights(), admin.describe().optimizer)
    replay_sync(model, 4, reduction=reduction)
    for final in finals:
        assert_same(final, model.weights())
    status = admin.status()
    assert status.version == 4 and status.rounds_completed == 4
    assert sorted(w.worker_id for w in status.workers) == sorted(WORKERS)
    assert all(w.last_sequence == 4 for w in status.workers)


def _serve_subprocess(checkpoint_dir: Path) -> tuple[subprocess.Popen, str]:
    """A fresh `paramserve serve` process on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "paramserve.server", "serve", "--port", str(port),
        "--mode", "sync", "--replicas", "3", "--checkpoint-dir", str(checkpoint_dir),
        "--no-snapshot-on-exit", "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(cmd), f"127.0.0.1:{port}"


def test_restore_replays_identically_here_and_in_a_fresh_server_process(
    start_server, connect, worker_pool, tmp_path
):
    server = start_server(mode="sync", replicas=3)
    admin = connect(server)
    admin.create_model(initial_weights(), OPTIMIZER)
    run_sync(worker_pool, server.address, 0, 2)
    snap = admin.snapshot()
    assert snap.version == 2
    run_sync(worker_pool, server.address, 2, 3)
    expected = dict(admin.pull())
    expected_state = dict(admin.optimizer_state())
    assert admin.status().version == 5

    assert admin.restore(snap.id).version == 2
    assert admin.status().version == 2
    run_sync(worker_pool, server.address, 2, 3)
    assert_same(admin.pull(), expected)
    assert_same(admin.optimizer_state(), expected_state)

    path = admin.download_snapshot(snap.id, tmp_path / "download" / "snap.safetensors")
    process, address = _serve_subprocess(tmp_path / "fresh")
    try:
        # The process may not listen yet: the first call waits for it.
        with Client(address, timeout_s=30, wait_for_server_s=60) as fresh:
            info = fresh.upload_snapshot(path, restore=True)
            assert info.id == snap.id and info.version == 2
            assert fresh.status().version == 2
            run_sync(worker_pool, address, 2, 3)
            assert_same(fresh.pull(), expected)
            assert_same(fresh.optimizer_state(), expected_state)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_async_applies_every_push_in_arrival_order(start_server, connect, worker_pool):
    server = start_server(mode="async")
    admin = connect(server)
    admin.create_model(initial_weights(), OPTIMIZER)
    futures = [worker_pool.submit(async_worker, server.address, w, 4) for w in WORKERS]
    applied = {w: f.result(timeout=60) for w, f in zip(WORKERS, futures, strict=True)}

    order = sorted((version, w, step) for w, pushes in applied.items() for version, step in pushes)
    assert [v for v, _, _ in order] == list(range(1, 13))  # one version per push
    for pushes in applied.values():
        assert [v for v, _ in pushes] == sorted(v for v, _ in pushes)
    model = LocalModel(initial_weights(), admin.describe().optimizer)
    zeros = {n: 0 * w for n, w in initial_weights().items()}
    for _, w, step in order:
        model.apply(known_gradients(w, step, zeros, sparse=False))
    assert_same(admin.pull(), model.weights())


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_bounded_staleness_blocks_a_fast_worker_until_the_slow_one_pushes(
    start_server, connect, worker_pool
):
    k = 2
    server = start_server(mode="stale", max_staleness=k, round_timeout_s=30.0)
    slow = connect(server, worker_id="slow")
    slow.create_model(initial_weights(), OPTIMIZER)
    zeros = {n: 0 * w for n, w in initial_weights().items()}

    def slow_push(step: int) -> None:
        slow.push(known_gradients("slow", step, zeros, sparse=False))

    def fast_state() -> tuple[int, bool]:
        worker = slow.status().worker("fast")
        return (worker.pushes, worker.pending) if worker else (0, False)

    slow_push(0)
    future = worker_pool.submit(stale_worker, server.address, "fast", k + 4)
    # The fast worker joins at the slow one's clock (1) and may run k pushes ahead of it:
    # k + 1 pushes go through, the next one waits.
    _wait_for(lambda: fast_state() == (k + 1, True))
    time.sleep(0.3)
    assert fast_state() == (k + 1, True) and not future.done()
    for released in range(k + 2, k + 5):
        slow_push(released)
        _wait_for(lambda n=released: fast_state()[0] == n)
    future.result(timeout=30)
    assert slow.status().version == 1 + 3 + k + 4
