"""Fault 2: a worker dies (SIGKILL) or is stopped (SIGSTOP) in sync mode with 3 replicas.

Rounds close by their 1 s deadline under the configured policy: ``partial`` applies the
gradients that arrived (a sum scaled up to 3 workers), ``abort`` fails the round with
ABORTED and the pushers resend with the same sequence. The other workers keep going,
no call hangs (each waits for one round deadline at most), and the worker that comes back
rejoins (the three train in full rounds again): a stopped
one's push from before the stop is refused as stale (FAILED_PRECONDITION), it pulls and its
next push is accepted; a killed one restarts with the same worker_id and continues after
its last sequence. The push log, replayed locally with optim_core, equals the final
weights: nothing was lost or applied twice along the way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserve.client import Client
from tests.support.asserts import assert_same
from tests.support.models.dense import ADAM, gradients, initial_weights
from tests.support.processes import Processes, process_state, read_jsonl
from tests.support.replay import LocalModel, combine, rounds
from tests.support.waiting import wait_until as wait_for

WORKERS = ("worker-a", "worker-b", "worker-c")
REPLICAS = 3
ROUND_TIMEOUT_S = 1.0
# A call waits for at most one round deadline (1 s). The bound is a hang guard, far above
# anything a busy machine needs, and below the workers' call timeout that a call waiting
# for the missing worker would run into.
CALL_BOUND_S = 30.0
CALL_TIMEOUT_S = 60.0
# How long the test waits for progress that takes a few seconds (only a hang runs into it).
PROGRESS_S = 60.0


def _version(push_log: Path) -> int:
    lines = read_jsonl(push_log)
    return lines[-1]["version"] if lines else 0


def _events(path: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(path) if e["event"] == event]


def _replay_locally(push_log: Path, final: dict[str, np.ndarray], optimizer: dict) -> list:
    """Every logged round on a local model (a partial sum scaled up to the replicas)."""
    model = LocalModel(initial_weights(), optimizer)
    log_rounds = rounds(read_jsonl(push_log))
    for version, entries in log_rounds:
        assert version == model.optimizer.iterations + 1
        assert all(e["applied"] for e in entries)
        weights = model.weights()
        grads = combine(
            [gradients(e["worker_id"], e["sequence"], weights) for e in entries], reduction="sum"
        )
        if len(entries) < REPLICAS:
            scale = np.float32(REPLICAS / len(entries))
            grads = {n: g * scale for n, g in grads.items()}
        model.apply(grads)
    assert_same(model.weights(), final)
    return log_rounds


class Job:
    """A sync server with three training worker processes, each with an event file."""

    def __init__(self, procs: Processes, tmp_path: Path, *, policy: str) -> None:
        self.procs, self.tmp_path = procs, tmp_path
        self.push_log = tmp_path / "push-log.jsonl"
        self.stop_file, self.pause_file = tmp_path / "stop", tmp_path / "pause"
        self.server = procs.server(
            "--mode", "sync", "--replicas", str(REPLICAS), "--deadline-policy", policy,
            "--round-timeout-s", str(ROUND_TIMEOUT_S), "--push-log", self.push_log,
        )  # fmt: skip
        self.admin = Client(self.server.address, timeout_s=30.0)
        self.admin.create_model(initial_weights(), ADAM)
        self.events = {w: tmp_path / f"{w}.jsonl" for w in WORKERS}
        self.workers = {w: self.start(w) for w in WORKERS}

    def start(self, worker_id: str, events: Path | None = None) -> subprocess.Popen:
        return self.procs.worker(
            "sync_trainer",
            address=self.server.address,
            worker_id=worker_id,
            events=str(events or self.events[worker_id]),
            until_version=10**6,
            step_sleep_s=0.005,
            pause_file=str(self.pause_file) if worker_id == "worker-c" else None,
            stop_file=str(self.stop_file),
            call_timeout_s=CALL_TIMEOUT_S,
        )

    def wait_version(self, version: int, timeout_s: float = PROGRESS_S) -> None:
        wait_for(
            lambda: _version(self.push_log) >= version,
            timeout_s=timeout_s,
            what=f"version {version}",
        )

    def wait_full_round(self, since: int) -> int:
        """The first round at or after version ``since`` with all three workers in it.

        A round needs the three pushes within the 1 s deadline: right after a rejoin, one of
        them may still miss it on a busy machine, so this waits for the three to train
        together again rather than asserting that the very first round was full.
        """

        def full() -> int | None:
            for version, entries in rounds(read_jsonl(self.push_log)):
                if version >= since and {e["worker_id"] for e in entries} == set(WORKERS):
                    return version
            return None

        return wait_for(full, timeout_s=PROGRESS_S, what=f"a full round from version {since}")

    def finish(self) -> tuple[dict[str, np.ndarray], Any]:
        self.stop_file.touch()
        for proc in self.workers.values():
            self.procs.join(proc, timeout_s=PROGRESS_S)
        final = dict(self.admin.pull())
        status = self.admin.status()
        optimizer = self.admin.describe().optimizer
        self.admin.close()
        assert self.server.terminate() == 0
        return final, status, optimizer

    def assert_calls_bounded(self, worker_ids) -> float:
        """No call of these workers timed out or came near it; returns the longest (s)."""
        calls = [e for w in worker_ids for e in read_jsonl(self.events[w]) if "seconds" in e]
        longest = max(calls, key=lambda e: e["seconds"])
        assert longest["seconds"] < CALL_BOUND_S, longest
        assert not [e for e in calls if e.get("code") == "DEADLINE_EXCEEDED"]
        return longest["seconds"]


def _stop_worker_c(job: Job) -> int:
    """Worker-c stops itself (SIGSTOP) right after its next pull; returns the pulled version."""
    job.pause_file.touch()
    pid = job.workers["worker-c"].pid
    wait_for(lambda: process_state(pid) == "T", timeout_s=PROGRESS_S, what="worker-c stopped")
    return _events(job.events["worker-c"], "paused")[0]["version"]


@pytest.mark.slow
def test_stopped_worker_partial_rounds_continue_and_it_rejoins(procs, tmp_path):
    job = Job(procs, tmp_path, policy="partial")
    job.wait_version(5)
    paused_at = _stop_worker_c(job)
    stopped = time.monotonic()
    job.wait_version(paused_at + 3)  # the other two go on, one round a second
    progress_s = time.monotonic() - stopped
    os.kill(job.workers["worker-c"].pid, signal.SIGCONT)

    def rejoined() -> dict | None:
        acks = _events(job.events["worker-c"], "ack")
        return next((a for a in acks if a["base"] > paused_at), None)

    ack = wait_for(rejoined, timeout_s=PROGRESS_S, what="worker-c's push accepted after SIGCONT")
    full = job.wait_full_round(since=ack["version"])
    job.wait_version(ack["version"] + 2)
    final, status, optimizer = job.finish()

    # The push prepared before the stop was refused as stale; a later one was accepted.
    stale = _events(job.events["worker-c"], "stale")
    assert stale and stale[0]["base"] == paused_at
    assert not ack["duplicate"] and ack["version"] > paused_at + 3
    log_rounds = _replay_locally(job.push_log, final, optimizer)
    partial = [v for v, entries in log_rounds if len(entries) < REPLICAS]
    # Worker-c stopped before pushing into the round for paused_at: that round and the
    # next two closed without it.
    assert {paused_at + 1, paused_at + 2, paused_at + 3} <= set(partial)
    assert status.rounds_partial == len(partial)
    assert {e["worker_id"] for e in dict(log_rounds)[full]} == set(WORKERS)
    longest_s = job.assert_calls_bounded(("worker-a", "worker-b"))
    print(
        f"worker-c stopped at version {paused_at}; the others made 3 partial rounds in "
        f"{progress_s:.1f} s (longest call {longest_s:.2f} s); {len(partial)} partial of "
        f"{len(log_rounds)} rounds; rejoined after SIGCONT"
    )


@pytest.mark.slow
def test_killed_worker_partial_rounds_continue_and_a_restarted_one_rejoins(procs, tmp_path):
    job = Job(procs, tmp_path, policy="partial")
    job.wait_version(5)
    job.workers["worker-c"].kill()  # kill -9 at an arbitrary point of its loop
    job.workers["worker-c"].wait(timeout=PROGRESS_S)
    killed_at = _version(job.push_log)
    job.wait_version(killed_at + 3)
    status = job.admin.status()
    last_sequence = status.worker("worker-c").last_sequence

    restarted_events = tmp_path / "worker-c-restarted.jsonl"
    job.workers["worker-c"] = job.start("worker-c", restarted_events)

    def accepted() -> dict | None:
        return next(iter(_events(restarted_events, "ack")), None)

    ack = wait_for(accepted, timeout_s=PROGRESS_S, what="the restarted worker-c's first push")
    full = job.wait_full_round(since=ack["version"])
    job.wait_version(ack["version"] + 2)
    final, status, optimizer = job.finish()

    assert _events(restarted_events, "start")[0]["sequence"] == last_sequence
    assert ack["sequence"] == last_sequence + 1 and not ack["duplicate"]
    assert ack["version"] > killed_at + 3
    log_rounds = _replay_locally(job.push_log, final, optimizer)
    assert {e["worker_id"] for e in dict(log_rounds)[full]} == set(WORKERS)
    # A push of worker-c left in the open round at the kill may still close the next round
    # (killed_at + 1); the two after it closed without worker-c, partially.
    for version in (killed_at + 2, killed_at + 3):
        assert "worker-c" not in {e["worker_id"] for e in dict(log_rounds)[version]}
    partial = [v for v, entries in log_rounds if len(entries) < REPLICAS]
    assert status.rounds_partial == len(partial) >= 2
    job.assert_calls_bounded(("worker-a", "worker-b"))


@pytest.mark.slow
def test_stopped_worker_abort_policy_aborts_rounds_until_it_returns(procs, tmp_path):
    job = Job(procs, tmp_path, policy="abort")
    job.wait_version(5)
    paused_at = _stop_worker_c(job)
    aborted_before = job.admin.status().rounds_aborted

    def aborted_twice_each() -> bool:
        return all(
            sum(r["code"] == "ABORTED" for r in _events(job.events[w], "retry")) >= 2
            for w in ("worker-a", "worker-b")
        )

    wait_for(aborted_twice_each, timeout_s=PROGRESS_S, what="two ABORTED pushes each")
    # No round can complete without worker-c: nothing was applied meanwhile.
    assert _version(job.push_log) == paused_at
    assert job.admin.status().rounds_aborted >= aborted_before + 2
    os.kill(job.workers["worker-c"].pid, signal.SIGCONT)
    job.wait_version(paused_at + 3)
    final, _, optimizer = job.finish()

    # The retried pushes (same sequence) went into a later round, once: every round full.
    log_rounds = _replay_locally(job.push_log, final, optimizer)
    resumed_round = dict(log_rounds)[paused_at + 1]
    assert {e["worker_id"] for e in resumed_round} == set(WORKERS)
    for w in ("worker-a", "worker-b"):
        retried = {r["sequence"] for r in _events(job.events[w], "retry")}
        entry = next(e for e in resumed_round if e["worker_id"] == w)
        assert entry["sequence"] in retried
    assert not _events(job.events["worker-c"], "stale")
    job.assert_calls_bounded(("worker-a", "worker-b"))
