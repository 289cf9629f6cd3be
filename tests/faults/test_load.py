"""Fault 5: load. Eight concurrent clients (2 processes x 4 threads) push a fixed number of times.

The clients start together (each says "ready", then the test gives the signal) and each pushes
sequences 1..PUSHES, sending every RESEND_EVERY-th push twice with the same sequence (a lost
reply), so the number of resends is known in advance and never depends on the machine's speed.
Each client logs every acknowledged push (worker_id, sequence, duplicate flag, version).
Afterwards the server's push log and the acknowledgements agree exactly: every acknowledged
push was applied once (none lost, none doubled), nothing unacknowledged was applied, every
resend was acknowledged as a duplicate, the versions are consecutive, and the final weights
and optimizer state equal a sequential optim_core replay of the pushes in the order the server
logged them. The push rate is printed (information only, never asserted).
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from paramserve.client import Client
from tests.support.asserts import assert_same
from tests.support.models.dense import ADAM, gradients, initial_weights
from tests.support.processes import Processes, iter_pushes, read_jsonl
from tests.support.replay import LocalModel
from tests.support.waiting import wait_until as wait_for

PROCESSES, THREADS = 2, 4
PUSHES, RESEND_EVERY = 150, 10  # per client: 150 pushes, 15 of them sent twice


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "stale"])
def test_concurrent_pushes_none_lost_none_doubled_replay_matches(
    procs: Processes, tmp_path, mode: str
):
    push_log = tmp_path / "push-log.jsonl"
    # Stale mode: a worker that has stopped pushing holds the others back for at most
    # round_timeout_s, after which it counts as gone.
    server = procs.server(
        "--mode", mode, "--max-staleness", "2", "--round-timeout-s", "1", "--push-log", push_log
    )  # fmt: skip
    events = tmp_path / "events"
    events.mkdir()
    go_file = tmp_path / "go"
    worker_ids = [f"p{p}-t{t}" for p in range(PROCESSES) for t in range(THREADS)]
    with Client(server.address, timeout_s=30.0) as admin:
        admin.create_model(initial_weights(), ADAM)
        pushers = [
            procs.worker(
                "load_pusher",
                address=server.address,
                worker_ids=worker_ids[p * THREADS : (p + 1) * THREADS],
                events_dir=str(events),
                go_file=str(go_file),
                pushes=PUSHES,
                resend_every=RESEND_EVERY,
            )
            for p in range(PROCESSES)
        ]

        def all_ready() -> bool:
            for pusher in pushers:
                if pusher.poll() is not None:
                    procs.join(pusher, timeout_s=0)  # shows its output if it failed
            ready = {e["worker_id"] for path in events.glob("*.jsonl") for e in read_jsonl(path)}
            return ready == set(worker_ids)

        wait_for(all_ready, timeout_s=120, what="every client to connect")
        go_file.touch()
        started_at = time.time()
        for pusher in pushers:
            procs.join(pusher, timeout_s=240)
        final, state = admin.pull(), dict(admin.optimizer_state())
        status = admin.status()
        optimizer = admin.describe().optimizer

    acks = [e for path in sorted(events.glob("*.jsonl")) for e in read_jsonl(path)]
    done = {e["worker_id"]: e["pushes"] for e in acks if e["event"] == "done"}
    assert done == dict.fromkeys(worker_ids, PUSHES)
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
    assert resent == len(worker_ids) * (PUSHES // RESEND_EVERY)  # the fixed schedule

    applied = list(iter_pushes(read_jsonl(push_log)))
    logged = [(e["worker_id"], e["sequence"]) for e in applied]
    assert len(set(logged)) == len(logged), "a push was applied twice"
    assert set(logged) == set(replies), "applied pushes differ from acknowledged pushes"
    assert [e["version"] for e in applied] == list(range(1, len(applied) + 1))
    assert all(
        versions.get((e["worker_id"], e["sequence"]), e["version"]) == e["version"] for e in applied
    )
    assert status.version == final.version == len(applied) == len(worker_ids) * PUSHES
    assert {w.worker_id: (w.last_sequence, w.pushes) for w in status.workers} == {
        w: (n, n) for w, n in done.items()
    }

    model = LocalModel(initial_weights(), optimizer)
    for e in applied:
        model.apply(gradients(e["worker_id"], e["sequence"]))
    assert_same(final, model.weights())
    assert_same(state, model.optimizer.state_dict())
    elapsed_s = max(max(e["time"] for e in acks) - started_at, 1e-3)  # information only
    print(
        f"{mode}: {PROCESSES * THREADS} clients, {len(applied)} pushes applied in "
        f"{elapsed_s:.1f} s ({len(applied) / elapsed_s:.0f} pushes/s), {resent} resent as "
        f"duplicates ({len(lost)} replies lost to a deadline and resent), 0 lost, 0 doubled"
    )
