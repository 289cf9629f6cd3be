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
from .settings import check_choice, check_min, check_positive

# The choices of AggregationConfig (and so of --mode, --reduction, --deadline-policy).
MODES = ("sync", "async", "stale")
REDUCTIONS = ("sum", "mean")
DEADLINE_POLICIES = ("partial", "abort")
# 2: per worker also the session of its newest push and the recent sequences that took
# effect (ranges with their session). A format-1 state is read as if every sequence within
# RECENT_SEQUENCES of the last one took effect from an unknown session.
STATE_FORMAT_VERSION = 2
# How far below a worker's last sequence the server still knows which sequences took effect
# (and from which client session): a resend or an out-of-order push within it is told apart
# from a reused sequence; below it, a push is refused.
RECENT_SEQUENCES = 1024


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
        """ConfigError (a ValueError) for any setting out of its range."""
        check_choice("mode", self.mode, MODES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("deadline_policy", self.deadline_policy, DEADLINE_POLICIES)
        check_min("replicas", self.replicas, 1, integer=True)
        check_positive("round_timeout_s", self.round_timeout_s)
        check_min("max_staleness", self.max_staleness, 0, integer=True)


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
    last_base_version: int = 0  # base version of its newest push that took effect
    duplicates: int = 0  # pushes acknowledged as duplicates since start or restore


@dataclass(frozen=True)
class AggregatorStatus:
    rounds_completed: int
    rounds_aborted: int
    rounds_partial: int
    pending_pushes: int
    workers: list[WorkerInfo]


def recent_to_ranges(recent: Mapping[int, str | None]) -> list[list[Any]]:
    """``{sequence: session}`` as sorted ``[first, last, session]`` runs (compact JSON)."""
    out: list[list[Any]] = []
    for sequence in sorted(recent):
        session = recent[sequence]
        if out and out[-1][1] == sequence - 1 and out[-1][2] == session:
            out[-1][1] = sequence
        else:
            out.append([sequence, sequence, session])
    return out


def recent_from_ranges(ranges: list[list[Any]]) -> dict[int, str | None]:
    """The inverse of :func:`recent_to_ranges` (ranges already checked)."""
    return {q: session for first, last, session in ranges for q in range(first, last + 1)}


def _check_worker(worker_id: Any, info: Any, version: int) -> dict[str, Any]:
    """One worker's entry, normalized to format 2; InvalidArgument if malformed."""
    if not isinstance(worker_id, str) or not worker_id:
        raise InvalidArgument(f"aggregation state: bad worker id {worker_id!r}")
    keys = {"last_sequence", "pushes", "clock"} | ({"session", "recent"} if version >= 2 else set())
    if not isinstance(info, Mapping) or set(info) != keys:
        raise InvalidArgument(
            f"aggregation state: worker {worker_id!r} needs exactly {', '.join(sorted(keys))}"
        )
    out: dict[str, Any] = {
        k: _count(info[k], f"{k} of worker {worker_id!r}")
        for k in ("last_sequence", "pushes", "clock")
    }
    last = out["last_sequence"]
    if version < 2:
        low = max(1, last - RECENT_SEQUENCES + 1)
        out["session"] = None
        out["recent"] = [[low, last, None]] if last else []
        return out
    session = info["session"]
    if session is not None and not isinstance(session, str):
        raise InvalidArgument(f"aggregation state: session of worker {worker_id!r} must be text")
    out["session"] = session
    ranges = info["recent"]
    previous = 0
    checked = []
    for run in ranges if isinstance(ranges, list) else [None]:
        ok = (
            isinstance(run, list)
            and len(run) == 3
            and all(isinstance(q, int) and not isinstance(q, bool) for q in run[:2])
            and previous < run[0] <= run[1] <= last
            and run[1] - run[0] < 2 * RECENT_SEQUENCES
            and (run[2] is None or isinstance(run[2], str))
        )
        if not ok:
            raise InvalidArgument(
                f"aggregation state: recent sequences of worker {worker_id!r} must be sorted "
                f"[first, last, session] runs within [1, {last}]; got {run!r:.100}"
            )
        previous = run[1]
        checked.append(list(run))
    out["recent"] = checked
    return out


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"aggregation state: {what} must be an integer >= 0; got {value!r}")
    return value


def check_aggregation_state(state: Any) -> dict[str, Any]:
    """Validate an ``export_state()`` dict (format 1 or 2); returns it as format 2.

    InvalidArgument if anything is malformed.
    """

    if not isinstance(state, Mapping):
        raise InvalidArgument(f"aggregation state must be a mapping; got {type(state).__name__}")
    expected = {"format_version", "workers", "rounds_completed", "rounds_aborted", "rounds_partial"}
    if set(state) != expected:
        raise InvalidArgument(
            f"aggregation state has keys {sorted(state)}, expected {sorted(expected)}"
        )
    version = state["format_version"]
    if version not in (1, STATE_FORMAT_VERSION) or isinstance(version, bool):
        raise InvalidArgument(
            f"aggregation state format_version is {version!r}, expected 1 or {STATE_FORMAT_VERSION}"
        )
    workers = state["workers"]
    if not isinstance(workers, Mapping):
        raise InvalidArgument("aggregation state: workers must be a mapping")
    out_workers = {wid: _check_worker(wid, info, version) for wid, info in workers.items()}
    out = {k: _count(state[k], k) for k in ("rounds_completed", "rounds_aborted", "rounds_partial")}
    return {"format_version": STATE_FORMAT_VERSION, "workers": out_workers, **out}
