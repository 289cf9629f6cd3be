"""Fault 1: the server is killed with kill -9 mid-training and resumed from its last snapshot.

Three worker processes train in sync mode against a daemon that snapshots every 0.2 s. The
daemon is SIGKILLed mid-training and restarted with ``--resume`` on the same port; the
workers (whose calls wait for the server) carry on to the end. The resumed server's push
log says which pushes it applied; replaying exactly those, in that order, into a fresh
daemon that restored the same snapshot file, and locally with optim_core, gives the same
weights and optimizer state, bit for bit.
"""

from __future__ import annotations

import shutil

import pytest

from paramserve.client import Client

from .procs import Processes, read_jsonl, wait_for
from .replay import assert_same, local_model_of, rounds, sync_replay
from .workers import ADAM, gradients, initial_weights

WORKERS = ("worker-c", "worker-a", "worker-b")  # not in sorted order: the server sorts
UNTIL_VERSION = 50
KILL_AT_VERSION = 20


def _snapshot_versions(directory) -> list[int]:
    return sorted(int(p.name[5:17]) for p in directory.glob("snap-*.safetensors"))


@pytest.mark.slow
def test_kill_9_mid_training_resume_equals_uninterrupted_run_from_the_snapshot(
    procs: Processes, tmp_path
):
    ckpt = tmp_path / "ckpt"
    flags = ["--mode", "sync", "--replicas", "3", "--round-timeout-s", "20"]
    flags += ["--checkpoint-dir", ckpt, "--snapshot-every-s", "0.2", "--no-snapshot-on-exit"]
    first_log, resumed_log = tmp_path / "first-push-log.jsonl", tmp_path / "resumed-push-log.jsonl"
    first = procs.server(*flags, "--push-log", first_log)
    with Client(first.address, timeout_s=30.0) as admin:
        admin.create_model(initial_weights(), ADAM)
    events = {w: tmp_path / f"{w}.jsonl" for w in WORKERS}
    # worker-c is slow, so the others are mostly waiting in an open round when the kill hits.
    workers = [
        procs.worker(
            "sync_trainer",
            address=first.address,
            worker_id=w,
            events=str(events[w]),
            until_version=UNTIL_VERSION,
            step_sleep_s=0.03 if w == "worker-c" else 0.0,
        )
        for w in WORKERS
    ]

    def applied_version() -> int:
        lines = read_jsonl(first_log)
        return lines[-1]["version"] if lines else 0

    with Client(first.address, timeout_s=5.0) as admin:

        def mid_round() -> bool:
            if applied_version() < KILL_AT_VERSION or _snapshot_versions(ckpt)[-1:] < [5]:
                return False
            return admin.status().pending_pushes > 0

        wait_for(mid_round, timeout_s=60, what=f"an open round after version {KILL_AT_VERSION}")
        first.kill()
    crashed_at = applied_version()
    assert crashed_at < UNTIL_VERSION, "the run ended before the kill"
    newest = sorted(ckpt.glob("snap-*.safetensors"))[-1]
    snapshot_file = shutil.copy(newest, tmp_path / "taken-snapshot.safetensors")

    resumed = procs.server(
        "--port", str(first.port), *flags, "--resume", "--push-log", resumed_log
    )  # fmt: skip
    match = resumed.wait_for_message(r"resumed from snapshot (\S+) at version (\d+)", 30)
    snapshot_version = int(match.group(2))
    assert match.group(1) == newest.name.removesuffix(".safetensors")
    for worker in workers:
        procs.join(worker, timeout_s=90)

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
