"""Aggregation settings, push results, status, and the persisted aggregation state format.

Plain data shared by the :class:`~paramserve.server.aggregator.Aggregator`, the
snapshot code (which validates stored state with :func:`check_aggregation_state`)
and the transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

MODES = ("sync", "async", "stale")
REDUCTIONS = ("sum", "mean")
DEADLINE_POLICIES = ("partial", "abort")
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class AggregationConfig:
    """How pushes become optimizer steps (see the module docstring of each mode)."""

    mode: str = "sync"
    replicas: int = 1
    reduction: str = "sum"
    round_timeout_s: float = 30.0
    deadline_policy: str = "partial"
    max_staleness: int = 4

    def __post_init__(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("reduction", REDUCTIONS),
            ("deadline_policy", DEADLINE_POLICIES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"`{name}` must be one of {allowed}. Received: {name}={getattr(self, name)!r}"
                )
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"`replicas` must be an integer >= 1. Received: {self.replicas!r}")
        if not self.round_timeout_s > 0:
            raise ValueError(f"`round_timeout_s` must be > 0. Received: {self.round_timeout_s!r}")
        if not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(
                f"`max_staleness` must be an integer >= 0. Received: {self.max_staleness!r}"
            )


@dataclass(frozen=True)
class PushResult:
    """``duplicate``: seen before, not re-applied; ``version``: the version after it."""

    duplicate: bool
    applied: bool
    version: int
    contributors: int


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    last_sequence: int
    pushes: int
    seconds_since_seen: float  # -1.0 when not seen since this server started or restored
    pending: bool


@dataclass(frozen=True)
class AggregatorStatus:
    rounds_completed: int
    rounds_aborted: int
    rounds_partial: int
    pending_pushes: int
    workers: list[WorkerInfo]


def check_aggregation_state(state: Any) -> dict[str, Any]:
    """Validate an ``export_state()`` dict; returns it normalized, InvalidArgument if bad."""

    def count(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(
                f"aggregation state: {what} must be an integer >= 0; got {value!r}"
            )
        return value

    if not isinstance(state, Mapping):
        raise InvalidArgument(f"aggregation state must be a mapping; got {type(state).__name__}")
    expected = {"format_version", "workers", "rounds_completed", "rounds_aborted", "rounds_partial"}
    if set(state) != expected:
        raise InvalidArgument(
            f"aggregation state has keys {sorted(state)}, expected {sorted(expected)}"
        )
    if state["format_version"] != STATE_FORMAT_VERSION:
        raise InvalidArgument(
            f"aggregation state format_version is {state['format_version']!r}, "
            f"expected {STATE_FORMAT_VERSION}"
        )
    workers = state["workers"]
    if not isinstance(workers, Mapping):
        raise InvalidArgument("aggregation state: workers must be a mapping")
    out_workers = {}
    for worker_id, info in workers.items():
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidArgument(f"aggregation state: bad worker id {worker_id!r}")
        if not isinstance(info, Mapping) or set(info) != {"last_sequence", "pushes", "clock"}:
            raise InvalidArgument(
                f"aggregation state: worker {worker_id!r} needs exactly "
                "last_sequence, pushes and clock"
            )
        out_workers[worker_id] = {
            k: count(info[k], f"{k} of worker {worker_id!r}")
            for k in ("last_sequence", "pushes", "clock")
        }
    out = {k: count(state[k], k) for k in ("rounds_completed", "rounds_aborted", "rounds_partial")}
    return {"format_version": STATE_FORMAT_VERSION, "workers": out_workers, **out}
