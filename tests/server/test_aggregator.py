"""Aggregator: exactly-once, sync rounds (bit-exact with a local replay), deadlines, staleness."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from paramserve.server.aggregator import (
    AggregationConfig,
    Aggregator,
    PushResult,
    check_aggregation_state,
)
from paramserve.server.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from paramserve.server.store import ModelStore
from paramserve.wire import SparseRows
from tests.support.asserts import assert_same as assert_bitwise_equal
from tests.support.models.mixed import grads_for, model_vars
from tests.support.replay import LocalReplay
from tests.support.waiting import WAIT_S, count_waiters, wait_until

from .helpers import ManualClock


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=12)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


def make(
    optimizer: str = "adam", *, nonfinite: str = "reject", **config
) -> tuple[ModelStore, Aggregator]:
    store = ModelStore(nonfinite=nonfinite)
    store.create_model("m", optimizer, model_vars())
    return store, Aggregator(store, AggregationConfig(**config))


def make_timed(optimizer: str = "adam", **config) -> tuple[ModelStore, Aggregator, ManualClock]:
    """Like :func:`make`, with a clock the test moves: round deadlines, staleness waits and
    push deadlines pass when the test advances it, never because the machine is slow."""
    store = ModelStore()
    store.create_model("m", optimizer, model_vars())
    clock = ManualClock(store)
    return store, Aggregator(store, AggregationConfig(**config), clock=clock), clock


def pending(agg: Aggregator) -> int:
    return agg.status().pending_pushes


def push_in_order(
    pool: ThreadPoolExecutor, agg: Aggregator, pushes: list[tuple[str, int, int, dict]]
) -> list[Future]:
    """Start pushes one by one, each after the previous one is pending (arrival order)."""
    futures = []
    for i, (worker, seq, base, grads) in enumerate(pushes):
        futures.append(pool.submit(agg.push, worker, seq, base, grads))
        if i < len(pushes) - 1:
            wait_until(lambda n=i + 1: pending(agg) >= n or futures[-1].done())
    return futures


# --- async ------------------------------------------------------------------------------
def test_async_apply_is_bit_exact_with_local_optim_core() -> None:
    store, agg = make(mode="async")
    replay = LocalReplay("adam", model_vars())
    for seq in range(1, 5):
        grads = grads_for(model_vars(), seq)
        if seq == 3:  # a subset, with sparse rows
            grads = {"emb": SparseRows(np.array([4, 1, 4]), np.ones((3, 2), np.float32))}
        result = agg.push("w", seq, 0, grads)
        assert result == PushResult(duplicate=False, applied=True, version=seq, contributors=1)
        if seq == 3:
            from paramserve.optim_core import IndexedSlices

            grads = {"emb": IndexedSlices(grads["emb"].indices, grads["emb"].values)}
        replay.apply(grads)
    assert_bitwise_equal(store.read()[1], replay.weights())


def test_duplicates_are_acknowledged_never_reapplied() -> None:
    store, agg = make(mode="async")
    grads = grads_for(model_vars(), 0)
    assert agg.push("w", 1, 0, grads).version == 1
    weights = store.read()[1]
    # The same sequence again (even with garbage: a duplicate is not re-validated) and an older one.
    dup = agg.push("w", 1, 0, {"nope": np.zeros(1)})
    assert dup == PushResult(duplicate=True, applied=False, version=1, contributors=0)
    assert agg.push("w", 2, 1, grads).version == 2
    assert agg.push("w", 1, 0, grads).duplicate
    assert store.version == 2
    assert agg.status().workers[0].last_sequence == 2
    assert agg.status().workers[0].pushes == 2
    assert not np.array_equal(store.read()[1]["emb"], weights["emb"])


def test_concurrent_retries_apply_once(pool: ThreadPoolExecutor) -> None:
    store, agg = make(mode="async")
    grads = grads_for(model_vars(), 0)
    barrier = threading.Barrier(6)

    def retry() -> PushResult:
        barrier.wait()
        return agg.push("w", 1, 0, grads)

    results = [f.result(WAIT_S) for f in [pool.submit(retry) for _ in range(6)]]
    assert sorted(r.duplicate for r in results) == [False] + [True] * 5
    assert store.version == 1
    replay = LocalReplay("adam", model_vars())
    replay.apply(grads)
    assert_bitwise_equal(store.read()[1], replay.weights())


def test_bad_push_records_nothing_and_a_fixed_retry_is_accepted() -> None:
    store, agg = make(mode="async")
    before = store.read()
    with pytest.raises(InvalidArgument, match="has dtype float64, expected float32"):
        agg.push("w", 1, 0, {"dense/bias": np.zeros(3, np.float64)})
    with pytest.raises(NotFound):
        agg.push("w", 1, 0, {"nope": np.zeros(3, np.float32)})
    assert store.version == 0
    assert_bitwise_equal(store.read()[1], before[1])
    assert agg.export_state()["workers"]["w"]["last_sequence"] == 0
    assert not agg.push("w", 1, 0, grads_for(model_vars(), 0)).duplicate


@pytest.mark.parametrize(
    ("worker", "seq", "base", "needle"),
    [("", 1, 0, "worker_id"), ("w", 0, 0, "sequence >= 1"), ("w", 1, "0", "base_version")],
)
def test_push_identity_is_checked(worker, seq, base, needle) -> None:
    _, agg = make(mode="async")
    with pytest.raises(InvalidArgument, match=needle):
        agg.push(worker, seq, base, grads_for(model_vars(), 0))


def test_push_without_model_is_not_found() -> None:
    agg = Aggregator(ModelStore(), AggregationConfig(mode="sync"))
    with pytest.raises(NotFound, match="no model"):
        agg.push("w", 1, 0, {"w": np.zeros(1, np.float32)})


def test_nonfinite_skip_counts_as_taken_effect_async() -> None:
    store, agg = make(mode="async", nonfinite="skip")
    grads = grads_for(model_vars(), 0)
    grads["scale"] = np.array(np.nan, np.float32)
    assert agg.push("w", 1, 0, grads) == PushResult(False, False, 0, 0)
    assert agg.push("w", 1, 0, grads).duplicate
    assert_bitwise_equal(store.read()[1], model_vars())


# --- sync rounds ------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sync_round_is_bit_exact_in_worker_id_order(pool, reduction) -> None:
    store, agg = make(mode="sync", replicas=3, reduction=reduction, round_timeout_s=10)
    grads = {w: grads_for(model_vars(), i) for i, w in enumerate(["w0", "w1", "w2"])}
    # Arrival order differs from worker_id order; the result must not depend on it.
    futures = push_in_order(
        pool, agg, [("w2", 1, 0, grads["w2"]), ("w0", 1, 0, grads["w0"]), ("w1", 1, 0, grads["w1"])]
    )
    results = [f.result(WAIT_S) for f in futures]
    assert all(r == PushResult(False, True, 1, 3) for r in results)
    replay = LocalReplay("adam", model_vars())
    combined = {}
    for name in grads["w0"]:
        total = grads["w0"][name] + grads["w1"][name] + grads["w2"][name]
        combined[name] = total / np.float32(3) if reduction == "mean" else total
    replay.apply(combined)
    assert_bitwise_equal(store.read()[1], replay.weights())
    # Arrival order would have given other bits.
    arrival = (
        grads["w2"]["dense/kernel"] + grads["w0"]["dense/kernel"] + grads["w1"]["dense/kernel"]
    )
    assert (
        arrival.tobytes()
        != (
            grads["w0"]["dense/kernel"] + grads["w1"]["dense/kernel"] + grads["w2"]["dense/kernel"]
        ).tobytes()
    )
    assert agg.status().rounds_completed == 1


def test_sync_training_loop_three_workers(pool: ThreadPoolExecutor) -> None:
    store, agg = make("sgd", mode="sync", replicas=3, round_timeout_s=10)
    steps = 4

    def worker(index: int) -> list[int]:
        version, versions = 0, []
        for step in range(steps):
            result = agg.push(
                f"w{index}", step + 1, version, grads_for(model_vars(), 10 * step + index)
            )
            version = result.version
            versions.append(version)
        return versions

    results = [f.result(WAIT_S) for f in [pool.submit(worker, i) for i in range(3)]]
    assert results == [[1, 2, 3, 4]] * 3
    replay = LocalReplay("sgd", model_vars())
    for step in range(steps):
        parts = [grads_for(model_vars(), 10 * step + i) for i in range(3)]
        replay.apply({n: parts[0][n] + parts[1][n] + parts[2][n] for n in parts[0]})
    assert_bitwise_equal(store.read()[1], replay.weights())


def test_sync_rounds_with_concurrent_retries_apply_each_push_once(pool) -> None:
    """Every push is sent twice at once (a retry racing the original): same result as once."""
    store, agg = make("sgd", mode="sync", replicas=3, round_timeout_s=10)
    steps = 5

    def worker(index: int) -> None:
        version = 0
        for step in range(steps):
            grads = grads_for(model_vars(), 10 * step + index)
            twins = [pool.submit(agg.push, f"w{index}", step + 1, version, grads) for _ in "ab"]
            results = [t.result(WAIT_S) for t in twins]
            assert sorted(r.duplicate for r in results) == [False, True]
            assert len({r.version for r in results}) == 1
            version = results[0].version

    for future in [pool.submit(worker, i) for i in range(3)]:
        future.result(WAIT_S)  # re-raises a failed assertion of the worker
    assert store.version == steps
    replay = LocalReplay("sgd", model_vars())
    for step in range(steps):
        parts = [grads_for(model_vars(), 10 * step + i) for i in range(3)]
        replay.apply({n: parts[0][n] + parts[1][n] + parts[2][n] for n in parts[0]})
    assert_bitwise_equal(store.read()[1], replay.weights())
    assert agg.status().rounds_completed == steps


def test_sync_stale_base_version_and_second_push(pool: ThreadPoolExecutor) -> None:
    _store, agg = make(mode="sync", replicas=2, round_timeout_s=10)
    a = pool.submit(agg.push, "a", 1, 0, grads_for(model_vars(), 0))
    wait_until(lambda: pending(agg) == 1)
    with pytest.raises(FailedPrecondition, match="already pushed sequence 1 into the open round"):
        agg.push("a", 2, 0, grads_for(model_vars(), 1))
    with pytest.raises(
        FailedPrecondition, match="computed from version 3; the open round is for version 0"
    ):
        agg.push("b", 1, 3, grads_for(model_vars(), 1))
    assert agg.push("b", 1, 0, grads_for(model_vars(), 1)).version == 1
    assert a.result(WAIT_S).version == 1
    with pytest.raises(
        FailedPrecondition,
        match="computed from version 0; the open round is for version 1: pull and recompute",
    ):
        agg.push("a", 2, 0, grads_for(model_vars(), 2))
    # The refused push was not recorded: the same sequence with a fresh base is accepted.
    b = pool.submit(agg.push, "b", 2, 1, grads_for(model_vars(), 3))
    assert not agg.push("a", 2, 1, grads_for(model_vars(), 2)).duplicate
    assert b.result(WAIT_S).version == 2


def test_sync_concurrent_retry_joins_the_pending_push(pool: ThreadPoolExecutor) -> None:
    store, agg, _clock = make_timed(mode="sync", replicas=2, round_timeout_s=10)
    waiting = count_waiters(store)
    ga, gb = grads_for(model_vars(), 0), grads_for(model_vars(), 1)
    first = pool.submit(agg.push, "a", 1, 0, ga)
    wait_until(lambda: pending(agg) == 1)
    retry = pool.submit(agg.push, "a", 1, 0, ga)  # e.g. the client's deadline fired and it retried
    wait_until(lambda: waiting() == 2)  # the retry waits on the open round too
    assert not retry.done()
    assert agg.push("b", 1, 0, gb).version == 1
    assert first.result(WAIT_S) == PushResult(False, True, 1, 2)
    assert retry.result(WAIT_S) == PushResult(True, False, 1, 2)
    replay = LocalReplay("adam", model_vars())
    replay.apply({n: ga[n] + gb[n] for n in ga})
    assert_bitwise_equal(store.read()[1], replay.weights())
    assert agg.push("a", 1, 0, ga).duplicate  # after the round, a plain duplicate


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_deadline_partial_round_scales(pool, reduction) -> None:
    store, agg, clock = make_timed(
        mode="sync", replicas=3, reduction=reduction, round_timeout_s=0.2
    )
    ga, gb = grads_for(model_vars(), 0), grads_for(model_vars(), 1)
    futures = push_in_order(pool, agg, [("b", 1, 0, gb), ("a", 1, 0, ga)])
    wait_until(lambda: pending(agg) == 2)
    clock.advance(0.1)
    assert pending(agg) == 2  # status() closes a round past its deadline: not yet
    assert not any(f.done() for f in futures)
    clock.advance(0.2)  # past the deadline: the round closes with 2 of 3 workers
    results = [f.result(WAIT_S) for f in futures]
    assert all(r == PushResult(False, True, 1, 2) for r in results)
    replay = LocalReplay("adam", model_vars())
    if reduction == "sum":
        replay.apply({n: (ga[n] + gb[n]) * np.float32(3 / 2) for n in ga})
    else:
        replay.apply({n: (ga[n] + gb[n]) / np.float32(2) for n in ga})
    assert_bitwise_equal(store.read()[1], replay.weights())
    status = agg.status()
    assert (status.rounds_completed, status.rounds_partial, status.rounds_aborted) == (1, 1, 0)
    # The missing worker rejoins in the next round (after pulling version 1).
    with pytest.raises(FailedPrecondition, match="computed from version 0"):
        agg.push("c", 1, 0, grads_for(model_vars(), 2))
    late = pool.submit(agg.push, "c", 1, 1, grads_for(model_vars(), 2))
    wait_until(lambda: pending(agg) == 1)
    clock.advance(0.3)  # c alone: the round closes at its deadline
    assert late.result(WAIT_S).version == 2


def test_deadline_abort_then_retry_with_same_sequence(pool: ThreadPoolExecutor) -> None:
    store, agg, clock = make_timed(
        mode="sync", replicas=2, deadline_policy="abort", round_timeout_s=0.2
    )
    ga, gb = grads_for(model_vars(), 0), grads_for(model_vars(), 1)
    alone = pool.submit(agg.push, "a", 1, 0, ga)
    wait_until(lambda: pending(agg) == 1)
    clock.advance(0.3)
    with pytest.raises(Aborted, match=r"1 of 2 workers pushed within round_timeout_s=0\.2"):
        alone.result(WAIT_S)
    assert store.version == 0 and agg.status().rounds_aborted == 1
    assert agg.export_state()["workers"]["a"]["last_sequence"] == 0
    a = pool.submit(agg.push, "a", 1, 0, ga)
    b = agg.push("b", 1, 0, gb)
    assert not a.result(WAIT_S).duplicate and a.result(WAIT_S).applied and b.version == 1
    replay = LocalReplay("adam", model_vars())
    replay.apply({n: ga[n] + gb[n] for n in ga})
    assert_bitwise_equal(store.read()[1], replay.weights())


def test_round_deadline_holds_when_the_pusher_gave_up(pool: ThreadPoolExecutor) -> None:
    store, agg, clock = make_timed(mode="sync", replicas=2, round_timeout_s=0.2)
    ga = grads_for(model_vars(), 0)
    gives_up = pool.submit(agg.push, "a", 1, 0, ga, timeout_s=0.05)
    wait_until(lambda: pending(agg) == 1)
    clock.advance(0.1)  # past the push's own deadline, not the round's
    with pytest.raises(DeadlineExceeded, match="retry with the same sequence"):
        gives_up.result(WAIT_S)
    assert pending(agg) == 1
    clock.advance(0.2)  # past the round's deadline
    status = agg.status()  # nobody waits on the round: its deadline is still enforced
    assert status.pending_pushes == 0 and status.rounds_partial == 1
    assert store.version == 1
    assert agg.push("a", 1, 0, ga) == PushResult(True, False, 1, 0)


def test_sync_skipped_nonfinite_push_takes_part_without_gradient(pool) -> None:
    store, agg = make("sgd", mode="sync", replicas=2, nonfinite="skip", round_timeout_s=10)
    bad = grads_for(model_vars(), 0)
    bad["emb"][0, 0] = np.inf
    good = grads_for(model_vars(), 1)
    a = pool.submit(agg.push, "a", 1, 0, bad)
    wait_until(lambda: pending(agg) == 1)
    assert agg.push("b", 1, 0, good) == PushResult(False, True, 1, 1)
    assert a.result(WAIT_S) == PushResult(False, False, 1, 1)
    replay = LocalReplay("sgd", model_vars())
    replay.apply({n: good[n] * np.float32(2) for n in good})  # one of two: scaled like partial
    assert_bitwise_equal(store.read()[1], replay.weights())
    assert agg.push("a", 1, 0, bad).duplicate


def test_model_replaced_while_round_open_aborts_it(pool: ThreadPoolExecutor) -> None:
    store, agg = make(mode="sync", replicas=2, round_timeout_s=10)
    a = pool.submit(agg.push, "a", 1, 0, grads_for(model_vars(), 0))
    wait_until(lambda: pending(agg) == 1)
    store.import_state(store.export_state())
    with pytest.raises(Aborted, match="model was replaced"):
        a.result(WAIT_S)
    assert agg.export_state()["workers"]["a"]["last_sequence"] == 0


# --- bounded staleness ------------------------------------------------------------------
def test_stale_mode_blocks_the_fast_worker_until_the_slow_one_pushes(pool) -> None:
    store, agg, _clock = make_timed("sgd", mode="stale", max_staleness=1, round_timeout_s=5)
    g = grads_for(model_vars(), 0)
    agg.push("slow", 1, 0, g)
    agg.push("fast", 1, 0, g)
    agg.push("fast", 2, 0, g)  # fast is 1 ahead: allowed
    blocked = pool.submit(agg.push, "fast", 3, 0, g)  # 2 ahead: waits
    wait_until(lambda: pending(agg) == 1)
    assert not blocked.done()
    status = agg.status()
    assert status.pending_pushes == 1
    assert {w.worker_id: w.pending for w in status.workers} == {"fast": True, "slow": False}
    assert store.version == 3
    agg.push("slow", 2, 0, g)
    assert blocked.result(WAIT_S).applied
    assert store.version == 5


def test_stale_mode_treats_a_silent_worker_as_dead(pool: ThreadPoolExecutor) -> None:
    _store, agg, clock = make_timed("sgd", mode="stale", max_staleness=0, round_timeout_s=0.2)
    g = grads_for(model_vars(), 0)
    agg.push("slow", 1, 0, g)
    agg.push("fast", 1, 0, g)
    blocked = pool.submit(agg.push, "fast", 2, 0, g)
    wait_until(lambda: pending(agg) == 1)  # waiting for slow
    clock.advance(0.1)
    assert pending(agg) == 1 and not blocked.done()  # slow was seen 0.1 s ago: alive
    clock.advance(0.2)  # slow silent for longer than round_timeout_s: dead
    assert blocked.result(WAIT_S).applied
    # Once slow counts as dead, fast runs freely: the clock no longer moves, so a push that
    # waited for slow would never return.
    assert pool.submit(agg.push, "fast", 3, 0, g).result(WAIT_S).applied
    assert pending(agg) == 0


def test_stale_wait_deadline_does_not_apply(pool: ThreadPoolExecutor) -> None:
    store, agg, clock = make_timed("sgd", mode="stale", max_staleness=0, round_timeout_s=5)
    g = grads_for(model_vars(), 0)
    agg.push("slow", 1, 0, g)
    agg.push("fast", 1, 0, g)
    waits = pool.submit(agg.push, "fast", 2, 0, g, timeout_s=0.05)
    wait_until(lambda: pending(agg) == 1)
    clock.advance(0.1)  # past the push's deadline, long before slow counts as dead
    with pytest.raises(DeadlineExceeded, match="not applied"):
        waits.result(WAIT_S)
    assert store.version == 2
    assert agg.export_state()["workers"]["fast"]["last_sequence"] == 1


# --- shutdown, status, state ------------------------------------------------------------
def test_close_wakes_round_and_staleness_waiters(pool: ThreadPoolExecutor) -> None:
    # Clocks that never move: only close() can end these waits.
    store, agg, _clock = make_timed(mode="sync", replicas=2, round_timeout_s=30)
    waiter = pool.submit(agg.push, "a", 1, 0, grads_for(model_vars(), 0))
    wait_until(lambda: pending(agg) == 1)
    _s_store, s_agg, _s_clock = make_timed("sgd", mode="stale", max_staleness=0, round_timeout_s=30)
    g = grads_for(model_vars(), 0)
    s_agg.push("slow", 1, 0, g)
    s_agg.push("fast", 1, 0, g)
    s_waiter = pool.submit(s_agg.push, "fast", 2, 0, g)
    wait_until(lambda: s_agg.status().pending_pushes == 1)
    agg.close()
    s_agg.close()
    with pytest.raises(Unavailable):
        waiter.result(WAIT_S)
    with pytest.raises(Unavailable):
        s_waiter.result(WAIT_S)
    with pytest.raises(Unavailable):
        agg.push("b", 1, 0, g)
    assert store.version == 0 and agg.export_state()["workers"]["a"]["last_sequence"] == 0


def test_store_close_also_wakes_round_waiters(pool: ThreadPoolExecutor) -> None:
    store, agg = make(mode="sync", replicas=2, round_timeout_s=30)
    waiter = pool.submit(agg.push, "a", 1, 0, grads_for(model_vars(), 0))
    wait_until(lambda: pending(agg) == 1)
    store.close()
    with pytest.raises(Unavailable):
        waiter.result(WAIT_S)


def test_status_reports_workers() -> None:
    _, agg, clock = make_timed(mode="async")
    agg.push("b", 3, 0, grads_for(model_vars(), 0))
    clock.advance(1.5)
    agg.push("a", 1, 0, grads_for(model_vars(), 0))
    clock.advance(2.0)
    status = agg.status()
    assert [w.worker_id for w in status.workers] == ["a", "b"]
    assert status.workers[1].last_sequence == 3 and status.workers[1].pushes == 1
    assert [w.seconds_since_seen for w in status.workers] == [2.0, 3.5]


def test_export_import_state_keeps_dedupe() -> None:
    store, agg = make(mode="async")
    agg.push("a", 5, 0, grads_for(model_vars(), 0))
    state = agg.export_state()
    assert state == check_aggregation_state(state)
    fresh = Aggregator(store, AggregationConfig(mode="async"))
    fresh.import_state(state)
    assert fresh.status().workers[0].seconds_since_seen == -1.0  # not seen since the restore
    assert fresh.push("a", 5, 0, grads_for(model_vars(), 0)).duplicate
    assert fresh.export_state()["workers"]["a"]["pushes"] == 1


def test_the_recent_sequences_and_their_sessions_survive_export_and_import() -> None:
    store, agg = make(mode="async")
    for sequence, session in [(1, "s1"), (2, "s1"), (3, "s2"), (7, "s2"), (5, "s2")]:
        agg.push("a", sequence, store.version, grads_for(model_vars(), 0), session=session)
    state = agg.export_state()
    assert state["workers"]["a"]["recent"] == [
        [1, 2, "s1"],
        [3, 3, "s2"],
        [5, 5, "s2"],
        [7, 7, "s2"],
    ]
    assert state["workers"]["a"]["session"] == "s2"
    fresh = Aggregator(store, AggregationConfig(mode="async"))
    fresh.import_state(state)
    version = store.version
    assert fresh.push("a", 2, version, grads_for(model_vars(), 0), session="s1").duplicate
    with pytest.raises(FailedPrecondition, match="already used by another client session"):
        fresh.push("a", 2, version, grads_for(model_vars(), 0), session="s2")
    # 6 was never sent; s2 (the newest session) may still send it, anyone else may not.
    with pytest.raises(FailedPrecondition, match="never took effect"):
        fresh.push("a", 6, version, grads_for(model_vars(), 0), session="s1")
    assert fresh.push("a", 6, version, grads_for(model_vars(), 0), session="s2").applied


def test_a_format_1_state_counts_every_recent_sequence_as_seen_by_anyone() -> None:
    _, agg = make(mode="async")
    old = {
        "format_version": 1,
        "workers": {"a": {"last_sequence": 2000, "pushes": 2000, "clock": 2000}},
        "rounds_completed": 0,
        "rounds_aborted": 0,
        "rounds_partial": 0,
    }
    agg.import_state(old)
    assert agg.export_state()["workers"]["a"]["recent"] == [[977, 2000, None]]
    grads = grads_for(model_vars(), 0)
    assert agg.push("a", 2000, 0, grads, session="new").duplicate  # a resend, as before
    with pytest.raises(FailedPrecondition, match="more than 1024 below"):
        agg.push("a", 976, 0, grads, session="new")
    assert agg.push("a", 2001, 0, grads, session="new").applied


def test_the_recent_table_stays_bounded() -> None:
    store, agg = make("sgd", mode="async")
    grads = grads_for(model_vars(), 0)
    for sequence in range(1, 3 * 1024):
        agg.push("a", sequence, store.version, grads, session="s")
    ranges = agg.export_state()["workers"]["a"]["recent"]
    assert len(ranges) == 1 and ranges[0][1] == 3 * 1024 - 1
    assert ranges[0][1] - ranges[0][0] < 2 * 1024


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: s.pop("workers"), "keys"),
        (lambda s: s.update(format_version=3), "format_version"),
        (lambda s: s["workers"]["a"].update(recent=[[5, 9, None]]), "recent"),
        (lambda s: s["workers"]["a"].update(session=7), "session"),
        (lambda s: s["workers"]["a"].update(last_sequence=-1), "last_sequence"),
        (lambda s: s["workers"].update({"": {"last_sequence": 1, "pushes": 1, "clock": 1}}), "id"),
        (lambda s: s.update(rounds_completed="many"), "rounds_completed"),
    ],
)
def test_import_state_is_validated_first(mutate: Callable, needle: str) -> None:
    _, agg = make(mode="async")
    agg.push("a", 5, 0, grads_for(model_vars(), 0))
    good = agg.export_state()
    bad = agg.export_state()
    mutate(bad)
    with pytest.raises(InvalidArgument, match=needle):
        agg.import_state(bad)
    assert agg.export_state() == good


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "ring"},
        {"replicas": 0},
        {"reduction": "max"},
        {"round_timeout_s": 0},
        {"deadline_policy": "wait"},
        {"max_staleness": -1},
    ],
)
def test_bad_aggregation_config(kwargs) -> None:
    with pytest.raises(ValueError):
        AggregationConfig(**kwargs)
