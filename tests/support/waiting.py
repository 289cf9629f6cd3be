"""Bounded waits for a condition: a test waits for what it needs, never for a guessed time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from paramserve.server.store import ModelStore

# How long a test waits for something that takes milliseconds: only a hang runs into it.
WAIT_S = 60.0


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = WAIT_S, *, what: str = "the condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError
    after ``timeout_s``. Polls every millisecond at first, backing off to every 10 ms, so a
    long wait costs little CPU on a busy machine."""
    deadline = time.monotonic() + timeout_s
    pause_s = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(pause_s)
        pause_s = min(2 * pause_s, 0.01)


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
