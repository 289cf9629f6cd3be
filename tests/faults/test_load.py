"""Fault 5: load. Eight concurrent clients (2 processes x 4 threads) push for a bounded time.

Each client logs every acknowledged push (worker_id, sequence, duplicate flag, version) and
resends about one push in ten with the same sequence (a lost reply). Afterwards the
server's push log and the acknowledgements agree exactly: every acknowledged push was
applied once (none lost, none doubled), nothing unacknowledged was applied, the versions
are consecutive, and the final weights and optimizer state equal a sequential optim_core
replay of the pushes in the order the server logged them.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from paramserve.client import Client

from .procs import Processes, iter_pushes, read_jsonl
from .replay import LocalModel, assert_same
from .workers import ADAM, gradients, initial_weights

PROCESSES, THREADS = 2, 4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "duration_s"), [("async", 5.0), ("stale", 2.0)], ids=["async", "stale"]
)
def test_concurrent_pushes_none_lost_none_doubled_replay_matches(
    procs: Processes, tmp_path, mode: str, duration_s: float
):
    push_log = tmp_path / "push-log.jsonl"
    # Stale mode: a worker that has stopped pushing holds the others back for at most
    # round_timeout_s, after which it counts as gone.
    server = procs.server(
        "--mode", mode, "--max-staleness", "2", "--round-timeout-s", "1", "--push-log", push_log
    )  # fmt: skip
    events = tmp_path / "events"
    events.mkdir()
    with Client(server.address, timeout_s=30.0) as admin:
        admin.create_model(initial_weights(), ADAM)
        start_at = time.time() + 1.5  # after the worker processes have started
        pushers = [
            procs.worker(
                "load_pusher",
                address=server.address,
                worker_ids=[f"p{p}-t{t}" for t in range(THREADS)],
                events_dir=str(events),
                start_at=start_at,
                duration_s=duration_s,
            )
            for p in range(PROCESSES)
        ]
        for pusher in pushers:
            procs.join(pusher, timeout_s=duration_s + 60)
        final, state = admin.pull(), dict(admin.optimizer_state())
        status = admin.status()
        optimizer = admin.describe().optimizer

    acks = [e for path in sorted(events.glob("*.jsonl")) for e in read_jsonl(path)]
    done = {e["worker_id"]: e["pushes"] for e in acks if e["event"] == "done"}
    assert len(done) == PROCESSES * THREADS
    replies: dict[tuple[str, int], list[bool]] = defaultdict(list)
    versions: dict[tuple[str, int], int] = {}
    for e in acks:
        if e["event"] == "ack":
            replies[(e["worker_id"], e["sequence"])].append(e["duplicate"])
            if not e["duplicate"]:  # the version its push produced
                versions[(e["worker_id"], e["sequence"])] = e["version"]
    lost = {(e["worker_id"], e["sequence"]) for e in acks if e["event"] == "lost"}
    # Every push was acknowledged as applied by its first reply, a resend as a duplicate
    # (after a reply really lost to a deadline, the first reply may be the duplicate).
    assert sorted(replies) == sorted((w, s) for w, n in done.items() for s in range(1, n + 1))
    for key, duplicates in replies.items():
        assert duplicates[1:] == [True] * (len(duplicates) - 1), key
        assert key in lost or not duplicates[0], key
    resent = sum(len(d) - 1 for d in replies.values())
    assert resent > 0

    applied = list(iter_pushes(read_jsonl(push_log)))
    logged = [(e["worker_id"], e["sequence"]) for e in applied]
    assert len(set(logged)) == len(logged), "a push was applied twice"
    assert set(logged) == set(replies), "applied pushes differ from acknowledged pushes"
    assert [e["version"] for e in applied] == list(range(1, len(applied) + 1))
    assert all(
        versions.get((e["worker_id"], e["sequence"]), e["version"]) == e["version"] for e in applied
    )
    assert status.version == final.version == len(applied)
    assert {w.worker_id: (w.last_sequence, w.pushes) for w in status.workers} == {
        w: (n, n) for w, n in done.items()
    }

    model = LocalModel(initial_weights(), optimizer)
    for e in applied:
        model.apply(gradients(e["worker_id"], e["sequence"]))
    assert_same(final, model.weights())
    assert_same(state, model.optimizer.state_dict())
    elapsed_s = max(e["time"] for e in acks) - start_at
    print(
        f"{mode}: {PROCESSES * THREADS} clients, {len(applied)} pushes applied in "
        f"{elapsed_s:.1f} s ({len(applied) / elapsed_s:.0f} pushes/s), {resent} resent as "
        f"duplicates ({len(lost)} replies lost to a deadline and resent), 0 lost, 0 doubled"
    )
