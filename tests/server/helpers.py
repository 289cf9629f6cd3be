"""The aggregator's manual clock for the server-core tests (the shared helpers are in
tests/support)."""

from __future__ import annotations

from paramserve.server.store import ModelStore


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
