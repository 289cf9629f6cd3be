"""Fault 1: the server is killed with kill -9 mid-training and resumed from its last snapshot.

Three worker processes train in sync mode. Worker-c stops itself (SIGSTOP) right after
pulling version 10, where the test takes a snapshot, and again after pulling version 20,
where the test SIGKILLs the daemon while the two others wait in the open round: no round
can close without worker-c, so these points do not depend on how fast anything runs. The
daemon is restarted with ``--resume`` on the same port from the snapshot of version 10, ten
rounds behind; the workers (whose calls wait for the server) carry on to the end, and each
has a push refused as stale (computed from a version the restored server never had). The
resumed server's push log says which pushes it applied; replaying exactly those, in that
order, into a fresh daemon that restored the same snapshot file, and locally with
optim_core, gives the same weights and optimizer state, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from paramserve.client import Client
from tests.support.asserts import assert_same
from tests.support.models.dense import ADAM, gradients, initial_weights
from tests.support.processes import Processes, process_state, read_jsonl
from tests.support.replay import local_model_of, rounds, sync_replay
from tests.support.waiting import wait_until as wait_for

WORKERS = ("worker-c", "worker-a", "worker-b")  # not in sorted order: the server sorts
UNTIL_VERSION = 50
SNAPSHOT_AT_VERSION = 10
KILL_AT_VERSION = 20


def _snapshot_versions(directory) -> list[int]:
    return sorted(int(p.name[5:17]) for p in directory.glob("snap-*.safetensors"))


@pytest.mark.slow
def test_kill_9_mid_training_resume_equals_uninterrupted_run_from_the_snapshot(
    procs: Processes, tmp_path
):
    ckpt = tmp_path / "ckpt"
    # Rounds are full: the round deadline (a hang guard) outlasts every wait of the test.
    flags = ["--mode", "sync", "--replicas", "3", "--round-timeout-s", "120"]
    flags += ["--checkpoint-dir", ckpt, "--no-snapshot-on-exit"]
    first_log, resumed_log = tmp_path / "first-push-log.jsonl", tmp_path / "resumed-push-log.jsonl"
    first = procs.server(*flags, "--push-log", first_log)
    with Client(first.address, timeout_s=30.0) as admin:
        admin.create_model(initial_weights(), ADAM)
    events = {w: tmp_path / f"{w}.jsonl" for w in WORKERS}
    workers = [
        procs.worker(
            "sync_trainer",
            address=first.address,
            worker_id=w,
            events=str(events[w]),
            until_version=UNTIL_VERSION,
            pause_at_versions=[SNAPSHOT_AT_VERSION, KILL_AT_VERSION] if w == "worker-c" else None,
        )
        for w in WORKERS
    ]
    worker_c = workers[WORKERS.index("worker-c")].pid

    def applied_version() -> int:
        lines = read_jsonl(first_log)
        return lines[-1]["version"] if lines else 0

    with Client(first.address, timeout_s=30.0) as admin:

        def held_at(version: int) -> bool:
            """Worker-c stopped after pulling ``version``; the others wait in its round."""
            if process_state(worker_c) != "T":
                return False
            status = admin.status()
            return status.version == version and status.pending_pushes == 2

        wait_for(lambda: held_at(SNAPSHOT_AT_VERSION), timeout_s=60, what="worker-c at v10")
        taken = admin.snapshot()
        assert taken.version == SNAPSHOT_AT_VERSION
        os.kill(worker_c, signal.SIGCONT)
        wait_for(lambda: held_at(KILL_AT_VERSION), timeout_s=60, what="worker-c at v20")
        first.kill()
    crashed_at = applied_version()
    assert crashed_at == KILL_AT_VERSION
    newest = sorted(ckpt.glob("snap-*.safetensors"))[-1]
    snapshot_file = shutil.copy(newest, tmp_path / "taken-snapshot.safetensors")

    resumed = procs.server(
        "--port", str(first.port), *flags, "--resume", "--push-log", resumed_log
    )  # fmt: skip
    match = resumed.wait_for_message(r"resumed from snapshot (\S+) at version (\d+)", 60)
    snapshot_version = int(match.group(2))
    assert match.group(1) == newest.name.removesuffix(".safetensors") == taken.id
    assert snapshot_version == SNAPSHOT_AT_VERSION
    os.kill(worker_c, signal.SIGCONT)
    for worker in workers:
        procs.join(worker, timeout_s=150)

    with Client(resumed.address, timeout_s=30.0) as admin:
        final = admin.pull()
        final_state = dict(admin.optimizer_state())
        status = admin.status()
    assert final.version == status.version == UNTIL_VERSION
    assert resumed.terminate() == 0

    # The workers rode out the crash: each ended on the last version, and some of their
    # pushes were refused as stale (computed from versions the restored server never had).
    logs = {w: read_jsonl(events[w]) for w in WORKERS}
    for entries in logs.values():
        assert entries[-2]["event"] == "pull" and entries[-2]["version"] == UNTIL_VERSION
    stale = sum(e["event"] == "stale" for entries in logs.values() for e in entries)
    for worker_id, entries in logs.items():  # every worker's push of round 20 was stale
        assert any(e["event"] == "stale" for e in entries), worker_id

    # Exactly the pushes the resumed server applied, round by round, nothing else.
    log = read_jsonl(resumed_log)
    assert log[0] == {"event": "restore", "version": snapshot_version}
    replayed = rounds(log)
    assert [v for v, _ in replayed] == list(range(snapshot_version + 1, UNTIL_VERSION + 1))
    for _, entries in replayed:
        assert [e["worker_id"] for e in entries] == sorted(WORKERS)
        assert all(e["applied"] for e in entries)

    fresh = procs.server(*flags[:6], "--checkpoint-dir", tmp_path / "replay-ckpt")
    with Client(fresh.address, timeout_s=30.0) as admin:
        info = admin.upload_snapshot(snapshot_file, restore=True)
        assert info.version == snapshot_version
        model = local_model_of(admin)
        sync_replay(fresh.address, replayed, gradients, model)
        assert_same(admin.pull(), final)
        assert_same(admin.optimizer_state(), final_state)
    assert_same(model.weights(), final)
    assert_same(model.optimizer.state_dict(), final_state)
    print(
        f"kill -9 at version {crashed_at}, resumed from the snapshot at version "
        f"{snapshot_version} ({crashed_at - snapshot_version} rounds lost and redone, "
        f"{stale} stale pushes recomputed); {len(replayed)} rounds replayed bit-exactly"
    )
