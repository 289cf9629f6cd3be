"""Fault 3: every push is sent 1 to 3 times (lost replies); each is applied exactly once.

A lost reply is simulated on the client: the push is sent, its reply dropped (ignored,
or never received because the call's deadline ran out while the push waited in a sync
round), and the push is sent again with the same ``(worker_id, sequence)``. The server's
push log holds one line per push, the counters agree, and the weights equal a local
optim_core replay of each push once. The same holds across a snapshot restore and
across a kill -9 and ``--resume``: a resent push recorded in the snapshot is acknowledged
as a duplicate, one made after the snapshot is applied (once) on the restored state.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from paramserve.client import Client, DeadlineExceededError
from tests.support.asserts import assert_same
from tests.support.models.dense import ADAM, gradients, initial_weights
from tests.support.processes import Processes, iter_pushes, read_jsonl
from tests.support.replay import LocalModel, combine, rounds

PUSHES = 25


def _sends(rng: np.random.Generator) -> int:
    return int(rng.integers(1, 4))


def test_async_every_push_sent_1_to_3_times_is_applied_once(procs: Processes, tmp_path):
    push_log = tmp_path / "push-log.jsonl"
    server = procs.server("--mode", "async", "--push-log", push_log)
    worker_ids = [f"worker-{i}" for i in range(4)]

    def run(worker_id: str) -> tuple[int, int]:
        rng = np.random.default_rng(sum(worker_id.encode()))
        sends = duplicates = 0
        with Client(server.address, worker_id=worker_id, timeout_s=30.0) as client:
            for sequence in range(1, PUSHES + 1):
                grads = gradients(worker_id, sequence)
                replies = [
                    client.push(grads, sequence=sequence) for _ in range(_sends(rng))
                ]  # all but the last reply are "lost": the worker only sees the last one
                assert [r.duplicate for r in replies] == [False] + [True] * (len(replies) - 1)
                sends += len(replies)
                duplicates += len(replies) - 1
        return sends, duplicates

    with Client(server.address, timeout_s=30.0) as admin:
        admin.create_model(initial_weights(), ADAM)
        with ThreadPoolExecutor(len(worker_ids)) as pool:
            totals = [f.result(timeout=60) for f in [pool.submit(run, w) for w in worker_ids]]
        final, status = admin.pull(), admin.status()
        optimizer = admin.describe().optimizer
    sends = sum(s for s, _ in totals)
    assert sends > len(worker_ids) * PUSHES  # some pushes really were sent more than once

    applied = list(iter_pushes(read_jsonl(push_log)))
    assert sorted((e["worker_id"], e["sequence"]) for e in applied) == sorted(
        (w, s) for w in worker_ids for s in range(1, PUSHES + 1)
    )
    assert [e["version"] for e in applied] == list(range(1, len(applied) + 1))
    assert status.version == len(applied)
    assert [(w.worker_id, w.last_sequence, w.pushes) for w in status.workers] == [
        (w, PUSHES, PUSHES) for w in worker_ids
    ]
    model = LocalModel(initial_weights(), optimizer)
    for entry in applied:
        model.apply(gradients(entry["worker_id"], entry["sequence"]))
    assert_same(final, model.weights())


def test_sync_lost_replies_inside_and_after_rounds_apply_each_push_once(procs: Processes, tmp_path):
    push_log = tmp_path / "push-log.jsonl"
    server = procs.server(
        "--mode", "sync", "--replicas", "3", "--round-timeout-s", "30", "--push-log", push_log
    )
    worker_ids = ("worker-b", "worker-c", "worker-a")
    steps = 12
    # Per step, the two workers that are not last have had a reply lost inside the round.
    lost_replies = {s: {w: threading.Event() for w in worker_ids} for s in range(1, steps + 1)}

    def run(worker_id: str) -> int:
        """Per step: pull; send 1-3 times. Who comes last rotates; the others' first call has
        a 50 ms deadline, which certainly runs out inside the round: the last worker pushes
        only once both of those calls have ended. Then they resend (same sequence)."""
        rng = np.random.default_rng(sum(worker_id.encode()))
        lost_in_round = 0
        with Client(server.address, worker_id=worker_id, timeout_s=30.0) as client:
            for sequence in range(1, steps + 1):
                weights = client.pull(min_version=sequence - 1)
                assert weights.version == sequence - 1
                grads = gradients(worker_id, sequence, weights)
                last = worker_ids[sequence % len(worker_ids)]
                if worker_id == last:
                    for other in worker_ids:
                        if other != last:
                            assert lost_replies[sequence][other].wait(60)  # a hang guard
                else:
                    with pytest.raises(DeadlineExceededError):
                        client.push(grads, sequence=sequence, timeout_s=0.05)
                    lost_in_round += 1
                    lost_replies[sequence][worker_id].set()
                for _ in range(_sends(rng) - 1):  # replies lost after the round closed
                    assert client.push(grads, sequence=sequence).version == sequence
                final = client.push(grads, sequence=sequence)
                assert final.version == sequence
        return lost_in_round

    with Client(server.address, timeout_s=30.0) as admin:
        admin.create_model(initial_weights(), ADAM)
        with ThreadPoolExecutor(3) as pool:
            lost = sum(f.result(timeout=120) for f in [pool.submit(run, w) for w in worker_ids])
        final, status = admin.pull(), admin.status()
        optimizer = admin.describe().optimizer
    assert lost == 2 * steps  # two replies lost inside every round

    log_rounds = rounds(read_jsonl(push_log))
    assert [v for v, _ in log_rounds] == list(range(1, steps + 1))
    model = LocalModel(initial_weights(), optimizer)
    for version, entries in log_rounds:
        assert [(e["worker_id"], e["sequence"]) for e in entries] == [
            (w, version) for w in sorted(worker_ids)
        ]
        weights = model.weights()
        model.apply(
            combine([gradients(w, version, weights) for w in sorted(worker_ids)], reduction="sum")
        )
    assert_same(final, model.weights())
    assert status.rounds_completed == steps and status.rounds_partial == 0
    assert all((w.last_sequence, w.pushes) == (steps, steps) for w in status.workers)


def test_resent_pushes_across_restore_and_kill_9_resume(procs: Processes, tmp_path):
    ckpt, push_log = tmp_path / "ckpt", tmp_path / "push-log.jsonl"
    flags = ["--mode", "async", "--checkpoint-dir", ckpt, "--no-snapshot-on-exit"]
    server = procs.server(*flags, "--push-log", push_log)
    worker = "worker-0"

    def push(client: Client, sequences, *, duplicate: bool) -> None:
        for sequence in sequences:
            result = client.push(gradients(worker, sequence), sequence=sequence)
            assert result.duplicate is duplicate, (sequence, result)

    with Client(server.address, worker_id=worker, timeout_s=30.0) as client:
        client.create_model(initial_weights(), ADAM)
        optimizer = client.describe().optimizer
        push(client, range(1, 11), duplicate=False)
        snap = client.snapshot()
        push(client, range(11, 16), duplicate=False)
        assert client.restore(snap.id).version == 10
        before = dict(client.pull())
        push(client, range(6, 11), duplicate=True)  # recorded in the snapshot: not applied
        assert client.status().version == 10
        assert_same(client.pull(), before)
        push(client, range(11, 16), duplicate=False)  # made after the snapshot: applied once
        push(client, range(13, 16), duplicate=True)
        assert client.status().version == 15
        client.snapshot()
        push(client, range(16, 19), duplicate=False)
        server.kill()

        resumed = procs.server("--port", str(server.port), *flags, "--resume")
        resumed.wait_for_message(r"resumed from snapshot \S+ at version 15", 30)
        push(client, range(12, 16), duplicate=True)
        push(client, range(16, 19), duplicate=False)
        push(client, range(16, 19), duplicate=True)
        final, status = client.pull(), client.status()
    expected = LocalModel(initial_weights(), optimizer)
    for sequence in range(1, 19):
        expected.apply(gradients(worker, sequence))
    assert_same(final, expected.weights())
    assert final.version == status.version == 18
    assert (status.worker(worker).last_sequence, status.worker(worker).pushes) == (18, 18)
    # Before the restore and the crash, the log shows the pushes that were rolled back.
    assert [e["sequence"] for e in iter_pushes(read_jsonl(push_log))] == [
        *range(1, 16), *range(11, 19)
    ]  # fmt: skip
