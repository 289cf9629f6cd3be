"""Shared helpers for the server-core tests: models, gradients, a local optim_core replay."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserve import optim_core
from paramserve.optim_core import Variable
from paramserve.server.store import ModelStore

# How long a test waits for something that takes milliseconds: only a hang runs into it.
WAIT_S = 60.0


def model_vars(seed: int = 0) -> dict[str, np.ndarray]:
    """A small model: a matrix, a vector, an embedding table and a scalar."""
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((4, 3)).astype(np.float32),
        "dense/bias": rng.standard_normal(3).astype(np.float32),
        "emb": rng.standard_normal((10, 2)).astype(np.float32),
        "scale": np.array(0.5, dtype=np.float32),
    }


def grads_for(variables: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Gradients whose magnitudes vary widely, so float summation order shows in the bits."""
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for name, value in variables.items():
        mags = 10.0 ** rng.integers(-3, 4, size=value.shape)
        out[name] = np.asarray(rng.standard_normal(value.shape) * mags).astype(value.dtype)
    return out


class LocalReplay:
    """The same optimizer run locally with optim_core, as a bit-exact reference."""

    def __init__(self, optimizer: Any, variables: dict[str, np.ndarray]) -> None:
        self.opt = optim_core.get(optimizer)
        self.vars = {n: Variable(np.array(a, copy=True), path=n) for n, a in variables.items()}
        self.opt.build(list(self.vars.values()))

    def apply(self, grads: dict[str, Any]) -> None:
        names = list(grads)
        self.opt.apply([grads[n] for n in names], [self.vars[n] for n in names])

    def weights(self) -> dict[str, np.ndarray]:
        return {n: v.numpy() for n, v in self.vars.items()}


def assert_bitwise_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name}: {a} != {b}"


def assert_state_equal(a: tuple[int, list], b: tuple[int, list]) -> None:
    assert a[0] == b[0]
    assert [k for k, _ in a[1]] == [k for k, _ in b[1]]
    for (_, x), (_, y) in zip(a[1], b[1], strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


class _CountingCondition(threading.Condition):
    """A Condition that counts the threads blocked in :meth:`wait` (read it under the lock)."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.waiting = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting += 1  # under the lock, before wait() releases it
        try:
            return super().wait(timeout)
        finally:
            self.waiting -= 1  # the lock is held again


def count_waiters(store: ModelStore) -> Callable[[], int]:
    """Make ``store.changed`` count its waiters; returns a function giving that count.

    Every wait of the store and the aggregator sleeps on ``store.changed`` with the lock
    released, so a count read under the lock says exactly how many threads are parked there:
    a test waits for that instead of sleeping and hoping the other thread got that far.
    Call it before any thread uses the store.
    """
    changed = _CountingCondition(store.lock)
    store.changed = changed

    def waiting() -> int:
        with store.lock:
            return changed.waiting

    return waiting


class ManualClock:
    """The aggregator's clock, moved only by :meth:`advance`: deadlines without real time.

    Waits still sleep on ``store.changed`` (for the time left by this clock), and
    :meth:`advance` wakes them, so a deadline passes exactly when the test says so, however
    slow the machine.
    """

    def __init__(self, store: ModelStore, start: float = 1000.0) -> None:
        self._store = store
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._store.lock:
            self.now += seconds
            self._store.changed.notify_all()
