"""The metric hooks the core calls, and a null implementation.

The core (:class:`~paramserve.server.core.ServerCore` and the
:class:`~paramserve.server.aggregator.Aggregator` it drives) reports what it does through
one object passed as ``metrics=``: :class:`~paramserve.server.metrics.ServerMetrics` in the
daemon (Prometheus), :data:`NO_METRICS` by default (tests, tools, benchmarks). What only the
transport sees (calls, status codes, payload bytes) is counted there, not here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol


class CoreMetrics(Protocol):
    """What the core reports; every hook is cheap and never raises."""

    def observe_apply(self, seconds: float) -> None:
        """One optimizer apply on the store took ``seconds``."""

    def record_round(self, outcome: str) -> None:
        """A synchronous round ended: ``full``, ``partial`` or ``aborted``."""

    def observe_staleness(self, versions: int) -> None:
        """A push arrived ``versions`` behind the model (version minus its base version)."""

    def observe_round_wait(self, seconds: float) -> None:
        """A push spent ``seconds`` in the aggregator (sync: waiting for its round)."""

    def record_push(self, *, duplicate: bool, applied: bool, version: int) -> None:
        """A push succeeded: a duplicate, applied, or skipped (neither); ``version`` after it."""

    def set_model_version(self, version: int) -> None:
        """The model is now at ``version`` (created, restored, state set)."""

    def time_snapshot(self, trigger: str) -> AbstractContextManager[None]:
        """Time one snapshot taken for ``trigger`` (``rpc``, ``periodic``, ``exit``)."""

    def set_snapshot_size(self, size_bytes: int) -> None:
        """The snapshot just written takes ``size_bytes`` on disk."""


class NoMetrics:
    """Hooks that record nothing."""

    def observe_apply(self, seconds: float) -> None:
        """Record nothing."""

    def record_round(self, outcome: str) -> None:
        """Record nothing."""

    def observe_staleness(self, versions: int) -> None:
        """Record nothing."""

    def observe_round_wait(self, seconds: float) -> None:
        """Record nothing."""

    def record_push(self, *, duplicate: bool, applied: bool, version: int) -> None:
        """Record nothing."""

    def set_model_version(self, version: int) -> None:
        """Record nothing."""

    @contextlib.contextmanager
    def time_snapshot(self, trigger: str) -> Iterator[None]:
        """Time nothing."""
        yield

    def set_snapshot_size(self, size_bytes: int) -> None:
        """Record nothing."""


NO_METRICS: CoreMetrics = NoMetrics()
