"""Sync rounds stay consistent across shards when a worker dies mid-round, and a dead shard
gives workers a clear, retryable error instead of a hang.

Worker processes stop (and are SIGKILLed) at chosen points of the three-phase push
(prepare on every shard, commit to shard 0, apply the decision on the others); every shard
must then apply the same rounds as one server given only the pushes that were committed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from paramserve import optim_core
from paramserve.client import AbortedError, Client, DeadlineExceededError, UnavailableError
from tests.support.processes import Processes
from tests.support.servers import LocalServers
from tests.support.shards import SPLIT_BYTES, shard_gradients, shard_initial
from tests.support.waiting import wait_until


@pytest.fixture
def servers() -> Iterator[LocalServers]:
    started = LocalServers({})
    try:
        yield started
    finally:
        started.stop_all()


def _job(servers: LocalServers, **settings: Any) -> list[str]:
    return [servers.start(shards=3, shard_index=i, **settings).address for i in range(3)]


def _events(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def _stopped_worker(
    procs: Processes, tmp_path: Path, addresses: list[str], stage: str, prepare_on: int = 3
):
    events = tmp_path / f"stopper-{stage}.jsonl"
    proc = procs.worker(
        "sharded_stopper",
        addresses=addresses,
        worker_id="a",
        events=str(events),
        stage=stage,
        seed=1,
        prepare_on=prepare_on,
    )
    wanted = "committing" if stage == "committed" else "prepared"
    wait_until(
        lambda: wanted in _events(events) or proc.poll() is not None, what=f"worker a {wanted}"
    )
    assert proc.poll() is None, Path(proc.output_path).read_text()
    return proc


def _shard_states(addresses: list[str]) -> list[tuple[int, dict[str, np.ndarray]]]:
    states = []
    with Client(addresses) as client:
        for shard in client.shards:
            weights = shard.pull()
            states.append((weights.version, dict(weights)))
    return states


def _one_server_result(servers: LocalServers, pushes: list[tuple[str, int]], **settings: Any):
    """Weights and optimizer state of one server given ``pushes`` ((worker, seed)) in one round."""
    import threading

    address = servers.start(**settings).address
    clients = {w: Client(address, worker_id=w, timeout_s=60) for w, _ in pushes}
    first = next(iter(clients.values()))
    first.create_model(shard_initial(), optim_core.Adam(0.01))
    threads = [
        threading.Thread(target=clients[w].push, args=(shard_gradients(seed),))
        for w, seed in pushes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    weights, state = dict(first.pull()), dict(first.optimizer_state())
    for client in clients.values():
        client.close()
    return weights, state


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name, strict=True)


def test_worker_killed_before_committing_is_in_no_round_on_any_shard(
    servers: LocalServers, procs: Processes, tmp_path: Path
) -> None:
    settings = {"mode": "sync", "replicas": 2, "round_timeout_s": 1.5, "deadline_policy": "partial"}
    addresses = _job(servers, **settings)
    with Client(addresses, worker_id="b", timeout_s=60, split_threshold_bytes=SPLIT_BYTES) as b:
        b.create_model(shard_initial(), optim_core.Adam(0.01))
        assert b.describe().layout.by_name()["embedding"].split
        # Worker a prepares on shards 0 and 1 only, then dies before it commits.
        proc = _stopped_worker(procs, tmp_path, addresses, "prepared", prepare_on=2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        result = b.push(shard_gradients(2))
        assert result.applied and result.contributors == 1
        weights = b.pull()
        state = b.optimizer_state()
        status = b.status()
    assert [s.version for s in status.shard_statuses] == [1, 1, 1]
    assert [s.rounds_partial for s in status.shard_statuses] == [1, 1, 1]
    assert all(s.pending_pushes == 0 for s in status.shard_statuses)
    expected = _one_server_result(servers, [("b", 2)], **settings)
    _assert_same(expected[0], dict(weights))
    _assert_same(expected[1], dict(state))


def test_worker_killed_after_committing_is_in_the_round_on_every_shard(
    servers: LocalServers, procs: Processes, tmp_path: Path
) -> None:
    settings = {"mode": "sync", "replicas": 2, "round_timeout_s": 120.0}
    addresses = _job(servers, **settings)
    with Client(addresses, worker_id="b", timeout_s=60, split_threshold_bytes=SPLIT_BYTES) as b:
        b.create_model(shard_initial(), optim_core.Adam(0.01))
        proc = _stopped_worker(procs, tmp_path, addresses, "committed")
        wait_until(
            lambda: (
                b.shards[0].status().worker("a") is not None
                and b.shards[0].status().worker("a").pending
            ),
            what="worker a's commit in the coordinator's round",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        result = b.push(shard_gradients(2))
        assert result.contributors == 2
        weights = b.pull()
        state = b.optimizer_state()
        versions = [s.version for s in b.status().shard_statuses]
    assert versions == [1, 1, 1]
    expected = _one_server_result(servers, [("a", 1), ("b", 2)], **settings)
    _assert_same(expected[0], dict(weights))
    _assert_same(expected[1], dict(state))


def test_an_aborted_round_changes_no_shard(
    servers: LocalServers, procs: Processes, tmp_path: Path
) -> None:
    settings = {"mode": "sync", "replicas": 2, "round_timeout_s": 1.0, "deadline_policy": "abort"}
    addresses = _job(servers, **settings)
    with Client(addresses, worker_id="b", timeout_s=60, split_threshold_bytes=SPLIT_BYTES) as b:
        b.create_model(shard_initial(), optim_core.Adam(0.01))
        before = _shard_states(addresses)
        proc = _stopped_worker(procs, tmp_path, addresses, "prepared", prepare_on=3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with pytest.raises(AbortedError, match="aborted"):
            b.push(shard_gradients(2))
        after = _shard_states(addresses)
        assert [v for v, _ in after] == [0, 0, 0]
        for (_, old), (_, new) in zip(before, after, strict=True):
            _assert_same(old, new)
        # The same push, resent, joins the next round (and is aborted again: a is gone).
        with pytest.raises(AbortedError):
            b.push(shard_gradients(2), sequence=b.last_sequence)


def test_a_shard_left_a_round_behind_is_caught_up(servers: LocalServers) -> None:
    addresses = _job(servers, mode="sync", replicas=1)
    with Client(
        addresses, worker_id="w", timeout_s=30, split_threshold_bytes=SPLIT_BYTES
    ) as client:
        client.create_model(shard_initial(), optim_core.SGD(0.1))
        # The push's three phases, without handing the decision to shard 2.
        parts = client._split(shard_gradients(5))
        sequence = client._next_sequence(None)
        for index, shard in enumerate(client.shards):
            shard._push_grads(parts[index], 0, sequence, None, None, prepare=True)
        _, decision = client.shards[0]._commit_round(sequence, 0, skipped=False, timeout_s=30)
        client.shards[1]._apply_round(decision, timeout_s=30)
        assert [s.version for s in client.status().shard_statuses] == [1, 1, 0]
        weights = client.pull()  # sees shard 2 behind, catches it up, pulls again
        assert weights.version == 1
        assert [s.version for s in client.status().shard_statuses] == [1, 1, 1]
        expected = {
            n: v - np.float32(0.1) * shard_gradients(5)[n] for n, v in shard_initial().items()
        }
        for name, value in expected.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-6)


def test_a_killed_shard_gives_a_retryable_error_not_a_hang(procs: Processes) -> None:
    shards = [
        procs.server("--shards", "3", "--shard-index", str(i), "--mode", "async") for i in range(3)
    ]
    addresses = [s.address for s in shards]
    with Client(
        addresses, worker_id="w", timeout_s=60, split_threshold_bytes=SPLIT_BYTES
    ) as client:
        client.create_model(shard_initial(), optim_core.Adam(0.01))
        for seed in range(3):
            client.step(shard_gradients(seed))
        shards[2].kill()
        with pytest.raises((UnavailableError, DeadlineExceededError)) as info:
            client.push(shard_gradients(9), timeout_s=3)
        assert addresses[2] in str(info.value)
        # The other shards keep serving.
        assert [s.version for s in (client.shards[0].status(), client.shards[1].status())] == [4, 4]


def test_a_slow_shard_shows_in_the_clients_timings_and_its_metrics(
    servers: LocalServers,
) -> None:
    """Shard 1 is held (async: it applies nothing until released) while a push goes to all
    three: the other two answer first, so the client counts shard 1 as the one that answered
    last; every shard's handling time is in ``paramserve_rpc_seconds``. No time is compared:
    the order is forced by the hold, not by the machine's speed."""
    addresses = [
        servers.start(shards=3, shard_index=i, mode="async").address
        for i in range(3)
    ]
    worker = Client(addresses, worker_id="w", split_threshold_bytes=SPLIT_BYTES, timeout_s=60)
    admin = Client(addresses, worker_id="admin", timeout_s=60)
    try:
        worker.create_model(shard_initial(), optim_core.SGD(0.1))
        worker.push(shard_gradients(0))  # the model described, the sequence synced
        before = worker.shard_timings()
        admin.shards[1]._hold_updates(60, timeout_s=30)
        with ThreadPoolExecutor(1) as pool:
            pushed = pool.submit(worker.push, shard_gradients(1))
            versions = lambda: [s.status().version for s in admin.shards]  # noqa: E731
            wait_until(lambda: versions()[0] == 2 and versions()[2] == 2, timeout_s=60)
            assert versions()[1] == 1 and not pushed.done()
            admin.shards[1]._hold_updates(0, timeout_s=30)
            pushed.result(60)
        after = worker.shard_timings()
        assert [t.address for t in after] == addresses
        assert [a.calls - b.calls for a, b in zip(after, before, strict=True)] == [1, 1, 1]
        assert [a.slowest - b.slowest for a, b in zip(after, before, strict=True)] == [0, 1, 0]
        assert all(t.max_ms >= t.last_ms > 0 and t.mean_ms > 0 for t in after)
        for server in servers.started:
            text = generate_latest(server.metrics.registry).decode()
            assert 'paramserve_rpc_seconds_count{method="Push"} 2.0' in text
    finally:
        worker.delete_model()
        worker.close()
        admin.close()
