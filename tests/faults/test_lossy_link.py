"""Exactly once, end to end, over a lossy link (issue 7).

A worker pushes 30 gradients of 4 MiB and 30 of 64 KiB, and makes a Step after every fifth
push, through :class:`~tests.support.lossy_proxy.LossyProxy`, which cuts every connection it
carries at seeded random points in either direction: mid-upload (the request's bytes stop
and the connection is reset or closed) or mid-reply (an acknowledgement or the Step's
weights are lost after the server applied the push). The SDK must resend every one of them
by itself: the caller sees no exception, the server's push log holds each
``(worker_id, sequence)`` exactly once, and the final weights equal a local optim_core replay
of every push applied once.

The cut positions count message (HTTP/2 DATA) bytes and the worker makes one call at a time,
so a seed gives the same cuts in every run: they are certain, not a matter of timing. Each
cut fails exactly the attempt in flight, so every cut is a resend, and a push whose reply was
cut comes back as a duplicate: both are checked call by call.

``PARAMSERVE_LOSSY_RUNS=N`` runs the test N times in a row, seeds 1..N (default 1).
"""

from __future__ import annotations

import collections
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import pytest

from paramserve.client import Client
from tests.support.asserts import assert_same
from tests.support.lossy_proxy import Cut, LossyProxy
from tests.support.processes import Processes, iter_pushes, read_jsonl
from tests.support.replay import LocalModel

RUNS = int(os.environ.get("PARAMSERVE_LOSSY_RUNS", "1"))
BIG, SMALL = 1 << 20, 16 << 10  # float32 elements: 4 MiB and 64 KiB
BIG_PUSHES, SMALL_PUSHES, STEP_EVERY = 30, 30, 5
WORKER = "lossy-worker"
ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.001}}


@dataclass(frozen=True)
class Call:
    """One call of the schedule: ``push`` or ``step``, of one variable, with sequence ``n``."""

    kind: str
    variable: str
    size: int
    n: int

    def gradients(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.n)
        return {self.variable: rng.standard_normal(self.size, dtype=np.float32)}


def schedule(seed: int) -> list[Call]:
    """The pushes, shuffled by ``seed``, and a Step after every fifth; sequences 1, 2, ..."""
    pushes = [("big", BIG)] * BIG_PUSHES + [("small", SMALL)] * SMALL_PUSHES
    random.Random(seed).shuffle(pushes)
    kinds = []
    for i, push in enumerate(pushes, start=1):
        kinds.append(("push", *push))
        if i % STEP_EVERY == 0:
            kinds.append(("step", "small", SMALL))
    return [Call(kind, name, size, n) for n, (kind, name, size) in enumerate(kinds, start=1)]


@pytest.mark.parametrize("seed", range(1, RUNS + 1))
def test_pushes_and_steps_over_a_lossy_link_are_applied_exactly_once(
    procs: Processes, tmp_path, seed: int
):
    push_log = tmp_path / "push-log.jsonl"
    server = procs.server("--mode", "async", "--push-log", push_log)
    initial = {"big": np.zeros(BIG, np.float32), "small": np.zeros(SMALL, np.float32)}
    with Client(server.address, timeout_s=30.0) as admin:
        admin.create_model(initial, ADAM)
        optimizer = admin.describe().optimizer

    calls = schedule(seed)
    duplicates: list[bool] = []
    cut_during: list[list[Cut]] = []
    started = time.monotonic()
    with (
        LossyProxy(("127.0.0.1", server.port), seed=seed) as proxy,
        Client(proxy.address, worker_id=WORKER, timeout_s=60.0) as client,
    ):
        client.describe()  # Client.step's size check reads it once: here, not inside a step
        for call in calls:  # any exception fails the test: none may reach the caller
            before = len(proxy.cuts)
            if call.kind == "push":
                result = client.push(call.gradients(), sequence=call.n)
            else:
                weights = client.step(call.gradients(), names=[call.variable], sequence=call.n)
                assert weights.version == call.n
                result = weights.push_result
            assert (result.sequence, result.version) == (call.n, call.n)
            duplicates.append(result.duplicate)
            cut_during.append(proxy.cuts[before:])
        cuts, connections, resends = list(proxy.cuts), proxy.connections, client.resends
    seconds = time.monotonic() - started

    # Every push took effect exactly once, in order, and the weights show it.
    applied = list(iter_pushes(read_jsonl(push_log)))
    assert [(e["worker_id"], e["sequence"], e["version"]) for e in applied] == [
        (WORKER, call.n, call.n) for call in calls
    ]
    with Client(server.address, timeout_s=30.0) as admin:
        final, status = admin.pull(), admin.status()
    worker = status.worker(WORKER)
    assert (worker.last_sequence, worker.pushes, status.version) == (len(calls),) * 3
    model = LocalModel(initial, optimizer)
    for call in calls:
        model.apply(call.gradients())
    assert_same(final, model.weights())

    # The cuts were real and hit every kind of transfer; each cost exactly the attempt in
    # flight, and a push whose reply was cut (the server had applied it) came back as a
    # duplicate, one that was cut only mid-upload did not.
    kinds = collections.Counter(
        (call.kind, call.variable, cut.direction)
        for call, during in zip(calls, cut_during, strict=True)
        for cut in during
    )
    print(
        f"seed {seed}: {len(calls)} calls, {connections} connections, {len(cuts)} cuts "
        f"({sum(c.direction == 'up' for c in cuts)} mid-upload, "
        f"{sum(c.direction == 'down' for c in cuts)} mid-reply; "
        + ", ".join(f"{k} {v} {d}: {n}" for (k, v, d), n in sorted(kinds.items()))
        + f"), {resends} resends, {sum(duplicates)} duplicates, {seconds:.1f} s"
    )
    for call, duplicate, during in zip(calls, duplicates, cut_during, strict=True):
        assert duplicate == any(c.direction == "down" for c in during), (call, during)
    assert resends >= len(cuts) >= 10
    assert kinds["push", "big", "up"] > 0  # a 4 MiB push cut mid-upload
    assert kinds["push", "small", "up"] + kinds["step", "small", "up"] > 0  # 64 KiB ones
    assert kinds["push", "big", "down"] + kinds["push", "small", "down"] > 0  # a push's ack
    assert kinds["step", "small", "down"] > 0  # a Step's weights
