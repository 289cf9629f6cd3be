"""Aggregation of pushes: exactly-once dedupe, synchronous rounds, async and bounded staleness.

All state lives under the store's lock and every wait sleeps on ``store.changed`` with
a timeout, so a snapshot taken under ``store.lock`` sees the model and the dedupe table
at one point, and a dead or slow worker never holds a round past its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserve.wire import SparseRows

from .aggregation import (
    RECENT_SEQUENCES,
    STATE_FORMAT_VERSION,
    AggregationConfig,
    AggregatorStatus,
    PushResult,
    WorkerInfo,
    check_aggregation_state,
    recent_from_ranges,
    recent_to_ranges,
)
from .errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ParamServeError,
    SequenceRegressed,
    Unavailable,
)
from .hooks import NO_METRICS, CoreMetrics
from .push_log import PushLog
from .store import ModelStore

logger = logging.getLogger(__name__)

__all__ = [
    "AggregationConfig",
    "Aggregator",
    "AggregatorStatus",
    "PushResult",
    "WorkerInfo",
    "check_aggregation_state",
]


_UNSEEN = object()


@dataclass
class _Worker:
    last_sequence: int = 0
    pushes: int = 0
    clock: int = 0  # bounded staleness: pushes that took effect (floored on rejoin)
    last_seen: float | None = None
    # Sequences in (last_sequence - RECENT_SEQUENCES, last_sequence] that took effect, with
    # the session that sent each (None: unknown, restored from a format-1 snapshot).
    recent: dict[int, str | None] = field(default_factory=dict)
    session: str | None = None  # the session of the newest push that took effect
    # Shown by status() only, not kept in snapshots: since this server started or restored.
    last_base_version: int = 0  # of the newest push that took effect
    duplicates: int = 0  # pushes acknowledged as duplicates (resends that had taken effect)


@dataclass
class _Round:
    version: int
    generation: int
    opened_at: float
    # worker_id -> (sequence, session, prepared gradients or None when skipped as non-finite)
    contributions: dict[str, tuple[int, str, dict[str, Any] | None]] = field(default_factory=dict)
    done: bool = False
    applied_workers: set[str] = field(default_factory=set)  # whose gradients were applied
    version_after: int = 0
    contributors: int = 0
    error: ParamServeError | None = None


@dataclass(frozen=True)
class RoundMember:
    """One worker's push in a sharded sync round; ``applied`` False: dropped as non-finite."""

    worker_id: str
    sequence: int
    applied: bool


@dataclass(frozen=True)
class RoundDecision:
    """The coordinator's decision of the round opened at ``version``: its members."""

    version: int
    members: tuple[RoundMember, ...]


@dataclass
class _Prepared:
    """A sharded sync push held until its round is decided (see :meth:`Aggregator.prepare`)."""

    sequence: int
    session: str
    base_version: int
    generation: int
    gradients: dict[str, Any] | None  # None: dropped as non-finite (policy "skip")


# Decisions the coordinator remembers, to answer a commit resent after its round closed.
_RECENT_DECISIONS = 64


class _Revalidate(Exception):
    """The model was replaced while a push was being validated: check it again."""


class Aggregator:
    """Turns pushes from many workers into optimizer steps on one :class:`ModelStore`."""

    def __init__(
        self,
        store: ModelStore,
        config: AggregationConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        push_log: PushLog | None = None,
        metrics: CoreMetrics = NO_METRICS,
        shard_index: int = 0,
        shards: int = 1,
    ) -> None:
        self._store = store
        # A sharded sync job (shards > 1, sync): pushes are prepared, rounds are decided by
        # the coordinator (shard 0) and applied on the other shards by ApplyRound.
        self.shard_index, self.shards = shard_index, shards
        self._prepared: dict[str, _Prepared] = {}
        self._decisions: list[RoundDecision] = []  # the coordinator's newest, oldest first
        # Until then no update is applied: a sharded snapshot is being cut (see hold()).
        self._hold_until = 0.0
        self.config = config
        self._clock = clock
        # Told of every apply and of each sync round's end (full, partial, aborted); under
        # the lock.
        self._metrics = metrics
        self._push_log = push_log
        self._workers: dict[str, _Worker] = {}
        self._round: _Round | None = None
        self._stale_waiting: dict[str, int] = {}
        self._rounds_completed = 0
        self._rounds_aborted = 0
        self._rounds_partial = 0
        self._closed = False

    # --- the entry point -----------------------------------------------------------------
    def push(
        self,
        worker_id: str,
        sequence: int,
        base_version: int,
        grads: dict[str, np.ndarray | SparseRows],
        *,
        session: str = "",
        timeout_s: float | None = None,
    ) -> PushResult:
        """Apply (or join a round with) one push, exactly once per ``(worker_id, sequence)``.

        Blocks in sync mode until the round closes, and in stale mode while the worker
        is too far ahead. ``timeout_s`` bounds the wait (DeadlineExceeded); a push left
        in an open round may still take effect, and a retry with the same sequence
        then reports it as a duplicate. ``session`` identifies the client instance: a
        sequence at or below the worker's last one is a duplicate only if this session
        sent it (see :meth:`_duplicate`); ``base_version`` must be in [0, version].
        """
        self._check_push_arguments(worker_id, sequence, base_version, session)
        if self.sharded_sync:
            raise FailedPrecondition(
                f"this is shard {self.shard_index} of a sharded sync job: its pushes are "
                "prepared on every shard and committed to shard 0; use "
                "Client([every shard's address]) (PushHeader.prepare, CommitRound)",
                reason="SHARD_MISMATCH",
            )
        result = self._push(worker_id, sequence, base_version, grads, session, timeout_s)
        if result.duplicate:
            with self._store.lock:
                self._worker(worker_id).duplicates += 1
        return result

    @staticmethod
    def _check_push_arguments(
        worker_id: str, sequence: int, base_version: int, session: str
    ) -> None:
        """InvalidArgument for a malformed worker_id, sequence, base_version or session."""
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidArgument(
                "a push needs a non-empty worker_id",
                violations=[("worker_id", "must be a non-empty string")],
            )
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
            raise InvalidArgument(
                f"a push needs a sequence >= 1; got {sequence!r}",
                violations=[("sequence", "must be an integer >= 1")],
            )
        if isinstance(base_version, bool) or not isinstance(base_version, int):
            raise InvalidArgument(
                f"base_version must be an integer; got {base_version!r}",
                violations=[("base_version", "must be an integer")],
            )
        if base_version < 0:
            raise InvalidArgument(
                f"base_version must be >= 0 (the model version the gradients were computed "
                f"from); got {base_version}",
                violations=[("base_version", "must be >= 0")],
            )
        if not isinstance(session, str):
            raise InvalidArgument(
                f"session must be a string; got {type(session).__name__}",
                violations=[("session", "must be a string")],
            )

    def _push(
        self,
        worker_id: str,
        sequence: int,
        base_version: int,
        grads: dict[str, np.ndarray | SparseRows],
        session: str,
        timeout_s: float | None,
    ) -> PushResult:
        """:meth:`push` once its arguments are checked."""
        deadline = None if timeout_s is None else self._clock() + max(0.0, timeout_s)
        store = self._store
        while True:
            with store.lock:
                self._check_open()
                self._check_round_deadline()
                if not store.has_model:
                    raise NotFound(
                        "no model exists on this server; create one first", reason="NO_MODEL"
                    )
                self._see(worker_id)
                early = self._duplicate(worker_id, sequence, session)
                if early is not None:
                    return early
                if self.config.mode == "sync":
                    pending = self._pending_round(worker_id, sequence, session, base_version)
                    if pending is not None:
                        return self._await_round(pending, worker_id, deadline, duplicate=True)
                else:
                    self._check_base_version(base_version)
                generation = store.generation
            prepared = store.validate_push(grads)
            try:
                with store.lock:
                    if self.config.mode == "sync":
                        return self._join_round(
                            worker_id,
                            sequence,
                            session,
                            base_version,
                            prepared,
                            generation,
                            deadline,
                        )
                    return self._apply_now(
                        worker_id, sequence, session, base_version, prepared, generation, deadline
                    )
            except _Revalidate:
                continue

    # --- shared bookkeeping (all under store.lock) ---------------------------------------
    def _check_open(self) -> None:
        if self._closed or self._store.closed:
            raise Unavailable("the server is shutting down; pushes are refused")

    def _worker(self, worker_id: str) -> _Worker:
        # setdefault: import_state may have replaced the table since this push was seen.
        return self._workers.setdefault(worker_id, _Worker())

    def _see(self, worker_id: str) -> None:
        now = self._clock()
        worker = self._worker(worker_id)
        if worker.last_seen is None or now - worker.last_seen > self.config.round_timeout_s:
            # A new or returning worker starts at the slowest live clock, so it does not
            # hold the others back (bounded staleness) while it catches up.
            live = self._live_clocks(worker_id, now)
            if live:
                worker.clock = max(worker.clock, min(live.values()))
        worker.last_seen = now

    def _live_clocks(self, exclude: str, now: float) -> dict[str, int]:
        timeout = self.config.round_timeout_s
        return {
            wid: w.clock
            for wid, w in self._workers.items()
            if wid != exclude and w.last_seen is not None and now - w.last_seen <= timeout
        }

    def _duplicate(self, worker_id: str, sequence: int, session: str) -> PushResult | None:
        """The reply to a push seen before, None for a new one; FailedPrecondition otherwise.

        A sequence above the worker's last is new. At or below it, a sequence this session
        sent that took effect is a duplicate (a resend), and one it never sent within
        :data:`RECENT_SEQUENCES` is new (pushes of one client arriving out of order). Any
        other is refused, naming the last sequence: another client reusing the worker's
        sequences (a restarted worker counting from 1 again) would otherwise lose every push
        as a "duplicate".
        """
        worker = self._worker(worker_id)
        last = worker.last_sequence
        if sequence > last:
            return None
        sent_by = worker.recent.get(sequence, _UNSEEN)
        if sent_by is None or (sent_by is not _UNSEEN and sent_by == session):
            return PushResult(
                duplicate=True, applied=False, version=self._store.version, contributors=0
            )
        recent = sequence > last - RECENT_SEQUENCES
        if sent_by is _UNSEEN and session and session == worker.session and recent:
            return None
        if sent_by is _UNSEEN:
            what = "never took effect" if recent else f"is more than {RECENT_SEQUENCES} below it"
            cause = f"sequence {sequence} {what}"
        else:
            cause = f"sequence {sequence} was already used by another client session"
        raise SequenceRegressed(
            f"worker {worker_id!r} has pushed up to sequence {last}, and {cause}: "
            "a restarted worker that counts from 1 again, or two clients sharing one "
            f"worker_id? Continue from sequence {last + 1} (the SDK does this itself)",
            last_sequence=last,
            metadata={"worker_id": worker_id, "sequence": sequence},
        )

    def _check_base_version(self, base_version: int) -> None:
        """Refuse gradients computed from a version this server never had (every mode)."""
        version = self._store.version
        if base_version > version:
            raise FailedPrecondition(
                f"the gradients were computed from version {base_version}, but the model is "
                f"at version {version} (the server restarted from an older snapshot, or the "
                "weights came from another server): pull and recompute",
                reason="STALE_BASE_VERSION",
                metadata={"base_version": base_version, "version": version},
            )

    def _record(self, worker_id: str, sequence: int, session: str, base_version: int) -> None:
        worker = self._worker(worker_id)
        if sequence >= worker.last_sequence:
            worker.session = session
            worker.last_base_version = base_version
        worker.last_sequence = max(worker.last_sequence, sequence)
        worker.recent[sequence] = session
        if len(worker.recent) > 2 * RECENT_SEQUENCES:
            floor = worker.last_sequence - RECENT_SEQUENCES
            worker.recent = {q: s for q, s in worker.recent.items() if q > floor}
        worker.pushes += 1
        worker.clock += 1
        self._store.changed.notify_all()

    def _apply(self, grads: dict[str, Any]) -> int:
        """One optimizer step on the store, timed for the metrics; the new version."""
        start = time.perf_counter()
        version = self._store.apply(grads)
        self._metrics.observe_apply(time.perf_counter() - start)
        return version

    def _check_generation(self, generation: int) -> None:
        self._check_open()
        if self._store.generation != generation:
            raise _Revalidate

    # --- sync rounds ---------------------------------------------------------------------
    def _open_round(self) -> _Round | None:
        round_ = self._round
        return round_ if round_ is not None and not round_.done else None

    def _pending_round(
        self, worker_id: str, sequence: int, session: str, base_version: int
    ) -> _Round | None:
        """The open round already holding this exact push (a concurrent retry), else None.

        Raises FailedPrecondition for a stale base version or a second push in the round.
        """
        round_ = self._open_round()
        expected = round_.version if round_ is not None else self._store.version
        if base_version != expected:
            raise FailedPrecondition(
                f"the gradients were computed from version {base_version}; the open round is "
                f"for version {expected}: pull and recompute",
                reason="STALE_BASE_VERSION",
                metadata={"base_version": base_version, "version": expected},
            )
        if round_ is not None and worker_id in round_.contributions:
            pending_sequence, pending_session, _ = round_.contributions[worker_id]
            if pending_sequence == sequence and pending_session == session:
                return round_
            raise FailedPrecondition(
                f"worker {worker_id!r} already pushed sequence {pending_sequence} into the open "
                f"round for version {round_.version}; wait for that round to close",
                reason="ALREADY_IN_ROUND",
                metadata={
                    "worker_id": worker_id,
                    "sequence": pending_sequence,
                    "version": round_.version,
                },
            )
        return None

    def _join_round(
        self,
        worker_id: str,
        sequence: int,
        session: str,
        base_version: int,
        prepared: dict[str, Any] | None,
        generation: int,
        deadline: float | None,
    ) -> PushResult:
        self._check_generation(generation)
        self._check_round_deadline()
        duplicate = self._duplicate(worker_id, sequence, session)
        if duplicate is not None:
            return duplicate
        pending = self._pending_round(worker_id, sequence, session, base_version)
        if pending is not None:
            return self._await_round(pending, worker_id, deadline, duplicate=True)
        round_ = self._open_round()
        if round_ is None:
            store = self._store
            round_ = self._round = _Round(store.version, store.generation, self._clock())
        round_.contributions[worker_id] = (sequence, session, prepared)
        self._store.changed.notify_all()  # status() shows the pending push
        if len(round_.contributions) >= self.config.replicas:
            self._close_round(round_, partial=False)
        return self._await_round(round_, worker_id, deadline, duplicate=False)

    def _await_round(
        self, round_: _Round, worker_id: str, deadline: float | None, *, duplicate: bool
    ) -> PushResult:
        store = self._store
        while not round_.done:
            now = self._clock()
            if store.closed:
                self._fail_round(round_, Unavailable("the server is shutting down"))
                break
            if store.generation != round_.generation:
                self._fail_round(
                    round_,
                    Aborted("the model was replaced while the round was open; pull and push again"),
                )
                break
            round_deadline = self._round_deadline(round_)
            if now >= round_deadline:
                self._expire_round(round_)
                break
            wait_s = round_deadline - now
            if deadline is not None:
                if now >= deadline:
                    raise DeadlineExceeded(
                        f"the push is still pending in the round for version {round_.version} "
                        f"({len(round_.contributions)} of {self.config.replicas} workers); "
                        "retry with the same sequence to learn its outcome"
                    )
                wait_s = min(wait_s, deadline - now)
            store.changed.wait(wait_s)
        if round_.error is not None:
            raise round_.error.copy()
        return PushResult(
            duplicate=duplicate,
            applied=not duplicate and worker_id in round_.applied_workers,
            version=round_.version_after,
            contributors=round_.contributors,
        )

    def _check_round_deadline(self) -> None:
        """Resolve an open round whose deadline passed while nobody was waiting on it."""
        round_ = self._open_round()
        if round_ is not None and self._clock() >= self._round_deadline(round_):
            self._expire_round(round_)

    def _round_deadline(self, round_: _Round) -> float:
        """When an open round expires: its deadline, or the end of a hold if later."""
        return max(round_.opened_at + self.config.round_timeout_s, self._hold_until)

    def _expire_round(self, round_: _Round) -> None:
        if round_.done:
            return
        received = sorted(round_.contributions)
        cfg = self.config
        if cfg.deadline_policy == "partial":
            logger.warning(
                "round for version %d closed at its deadline with %d of %d workers: %s",
                round_.version,
                len(received),
                cfg.replicas,
                received,
            )
            self._close_round(round_, partial=True)
            return
        logger.warning(
            "round for version %d aborted at its deadline with %d of %d workers: %s",
            round_.version,
            len(received),
            cfg.replicas,
            received,
        )
        self._fail_round(
            round_,
            Aborted(
                f"the round for version {round_.version} was aborted: {len(received)} of "
                f"{cfg.replicas} workers pushed within round_timeout_s={cfg.round_timeout_s:g}; "
                "retry the push with the same sequence",
                metadata={"version": round_.version, "round_timeout_s": cfg.round_timeout_s},
            ),
        )

    def _close_round(self, round_: _Round, *, partial: bool) -> None:
        """Combine the contributions (sorted by worker_id), apply once, record sequences."""
        valid = sorted(
            ((wid, p) for wid, (_, _, p) in round_.contributions.items() if p is not None),
            key=lambda item: item[0],
        )
        try:
            version = self._apply_round([p for _, p in valid])
        except Exception:
            logger.exception("applying the round for version %d failed", round_.version)
            self._fail_round(
                round_, Aborted("the round could not be applied (server error); retry the push")
            )
            raise
        for worker_id, (sequence, session, _) in round_.contributions.items():
            self._record(worker_id, sequence, session, round_.version)
        if self.sharded_sync:
            self._decided(
                RoundDecision(
                    round_.version,
                    tuple(
                        RoundMember(wid, sequence, prepared is not None)
                        for wid, (sequence, _, prepared) in sorted(round_.contributions.items())
                    ),
                )
            )
        if self._push_log is not None:
            self._push_log.write(
                _push_entry(wid, sequence, version, applied=prepared is not None)
                for wid, (sequence, _, prepared) in sorted(round_.contributions.items())
            )
        self._rounds_completed += 1
        self._rounds_partial += int(partial)
        self._metrics.record_round("partial" if partial else "full")
        round_.version_after = version
        round_.contributors = len(valid)
        round_.applied_workers = {wid for wid, _ in valid}
        self._finish(round_)

    def _apply_round(self, gradients: list[dict[str, Any]]) -> int:
        """Combine a round's gradients (in worker_id order) and apply once; the version."""
        cfg = self.config
        if not gradients:
            return self._store.version
        # Fewer gradients than replicas (deadline, or skipped non-finite pushes): a sum is
        # scaled up to `replicas`; a mean is over the gradients received.
        short = len(gradients) < cfg.replicas and cfg.reduction == "sum"
        scale = cfg.replicas / len(gradients) if short else 1.0
        combined = self._store.combine(gradients, reduction=cfg.reduction, scale=scale)
        return self._apply(combined)

    def _finish(self, round_: _Round) -> None:
        round_.done = True
        # Waiters only need the outcome: let the gradients go now, not when the last returns.
        round_.contributions = {
            w: (seq, session, None) for w, (seq, session, _) in round_.contributions.items()
        }
        if self._round is round_:
            self._round = None
        self._store.changed.notify_all()

    def _fail_round(self, round_: _Round, error: ParamServeError) -> None:
        """Drop the round without applying it: waiters raise ``error``; nothing recorded."""
        if round_.done:
            return
        round_.error = error
        self._rounds_aborted += 1
        self._metrics.record_round("aborted")
        self._finish(round_)

    # --- async and bounded staleness -----------------------------------------------------
    def _apply_now(
        self,
        worker_id: str,
        sequence: int,
        session: str,
        base_version: int,
        prepared: dict[str, Any] | None,
        generation: int,
        deadline: float | None,
    ) -> PushResult:
        store = self._store
        started = self._clock()
        self._wait_unheld(deadline)
        while True:
            self._check_generation(generation)
            duplicate = self._duplicate(worker_id, sequence, session)
            if duplicate is not None:
                return duplicate
            self._check_base_version(base_version)
            if self.config.mode != "stale":
                break
            now = self._clock()
            wake_at = self._staleness_wait_until(worker_id, now)
            if wake_at is None:
                break
            give_up_at = started + self.config.round_timeout_s
            if now >= give_up_at:
                logger.warning(
                    "worker %r waited %.3g s for slower workers; proceeding and treating them "
                    "as dead",
                    worker_id,
                    now - started,
                )
                break
            if deadline is not None and now >= deadline:
                raise DeadlineExceeded(
                    f"worker {worker_id!r} is more than max_staleness="
                    f"{self.config.max_staleness} pushes ahead of the slowest worker and its "
                    "deadline passed while waiting; the push was not applied"
                )
            wake_at = min(wake_at, give_up_at, deadline if deadline is not None else wake_at)
            self._stale_waiting[worker_id] = self._stale_waiting.get(worker_id, 0) + 1
            try:
                store.changed.wait(max(0.0, wake_at - now))
            finally:
                self._stale_waiting[worker_id] -= 1
                if not self._stale_waiting[worker_id]:
                    del self._stale_waiting[worker_id]
        version = self._apply(prepared) if prepared is not None else store.version
        self._record(worker_id, sequence, session, base_version)
        applied = prepared is not None
        if self._push_log is not None:
            self._push_log.write([_push_entry(worker_id, sequence, version, applied=applied)])
        return PushResult(
            duplicate=False, applied=applied, version=version, contributors=int(applied)
        )

    def _staleness_wait_until(self, worker_id: str, now: float) -> float | None:
        """None when the worker may go ahead; else when its slowest blocker counts as dead."""
        mine = self._worker(worker_id).clock
        blockers = [
            wid
            for wid, clock in self._live_clocks(worker_id, now).items()
            if mine - clock > self.config.max_staleness
        ]
        if not blockers:
            return None
        last_seen = max(self._workers[wid].last_seen or now for wid in blockers)
        return last_seen + self.config.round_timeout_s

    # --- sharded sync jobs -----------------------------------------------------------------
    # Every shard holds a worker's push as *prepared* (prepare); once the worker holds every
    # shard's acknowledgement it commits to the coordinator, shard 0 (commit), whose round
    # logic (replicas, deadline, partial or abort) alone decides who is in each round and
    # applies its part; every member hands the decision to the other shards (apply_decision).
    # A worker that dies before committing is in no round anywhere; one that dies after is
    # in the round on every shard, since its gradients are already on each.
    @property
    def sharded_sync(self) -> bool:
        """Whether this is a shard of a sharded synchronous job."""
        return self.shards > 1 and self.config.mode == "sync"

    def _require_sharded_sync(self, what: str, *, coordinator: bool | None = None) -> None:
        if not self.sharded_sync:
            raise FailedPrecondition(
                f"{what} is for shards of a sharded sync job; this server is "
                + (
                    f"in {self.config.mode} mode"
                    if self.shards > 1
                    else "a job of its own (started without --shards)"
                ),
                reason="SHARD_MISMATCH",
            )
        if coordinator is not None and coordinator != (self.shard_index == 0):
            where = "the coordinator (shard 0)" if coordinator else "shards other than 0"
            raise FailedPrecondition(
                f"{what} goes to {where}; this is shard {self.shard_index} of {self.shards}",
                reason="SHARD_MISMATCH",
            )

    def prepare(
        self,
        worker_id: str,
        sequence: int,
        base_version: int,
        grads: dict[str, np.ndarray | SparseRows],
        *,
        session: str = "",
    ) -> PushResult:
        """Check and hold a push for the worker's next commit; answers at once.

        ``applied`` False (not a duplicate): the non-finite policy dropped it here, and the
        worker must commit it as skipped. A newer push of the worker replaces an older one.
        """
        self._require_sharded_sync("a prepared push")
        self._check_push_arguments(worker_id, sequence, base_version, session)
        store = self._store
        while True:
            with store.lock:
                self._check_open()
                self._require_model()
                self._see(worker_id)
                duplicate = self._duplicate(worker_id, sequence, session)
                if duplicate is not None:
                    return duplicate
                self._check_round_version(base_version)
                generation = store.generation
            prepared = store.validate_push(grads)
            with store.lock:
                if store.generation != generation:
                    continue
                self._check_open()
                self._check_round_version(base_version)
                self._prepared[worker_id] = _Prepared(
                    sequence, session, base_version, generation, prepared
                )
                store.changed.notify_all()
                return PushResult(
                    duplicate=False,
                    applied=prepared is not None,
                    version=store.version,
                    contributors=0,
                )

    def commit(
        self,
        worker_id: str,
        sequence: int,
        base_version: int,
        *,
        session: str = "",
        skipped: bool = False,
        timeout_s: float | None = None,
    ) -> tuple[PushResult, RoundDecision | None]:
        """Join the round with a prepared push (coordinator only); waits for the round.

        Returns the push's outcome and the decision of its round (None for a duplicate
        older than the decisions remembered).
        """
        self._require_sharded_sync("CommitRound", coordinator=True)
        self._check_push_arguments(worker_id, sequence, base_version, session)
        deadline = None if timeout_s is None else self._clock() + max(0.0, timeout_s)
        store = self._store
        with store.lock:
            self._wait_unheld(deadline)
            self._check_open()
            self._check_round_deadline()
            self._require_model()
            self._see(worker_id)
            duplicate = self._duplicate(worker_id, sequence, session)
            if duplicate is None:
                pending = self._pending_round(worker_id, sequence, session, base_version)
                if pending is not None:
                    duplicate = self._await_round(pending, worker_id, deadline, duplicate=True)
            if duplicate is not None:
                return duplicate, self._decision_with(worker_id, sequence)
            entry = self._prepared.get(worker_id)
            if (
                entry is None
                or (entry.sequence, entry.session) != (sequence, session)
                or entry.generation != store.generation
            ):
                raise FailedPrecondition(
                    f"worker {worker_id!r} commits sequence {sequence}, but this shard holds "
                    + (
                        "no prepared push of it"
                        if entry is None
                        else f"its prepared sequence {entry.sequence}"
                    )
                    + ": push to every shard with prepare set first, then commit",
                    reason="ROUND_NOT_PREPARED",
                    metadata={"worker_id": worker_id, "sequence": sequence},
                )
            gradients = None if skipped else entry.gradients
            result = self._join_round(
                worker_id,
                sequence,
                session,
                base_version,
                gradients,
                store.generation,
                deadline,
            )
            return result, self._decision_with(worker_id, sequence)

    def apply_decision(self, decision: RoundDecision) -> tuple[int, bool]:
        """Apply the coordinator's decision here: ``(version, applied now)``; idempotent.

        Aborted (ROUND_OUT_OF_ORDER) for a decision past this shard's version: the decision
        before it must come first.
        """
        self._require_sharded_sync("ApplyRound", coordinator=False)
        store = self._store
        with store.lock:
            self._check_open()
            self._require_model()
            current = store.version
            done = all(
                self._worker(m.worker_id).recent.get(m.sequence, _UNSEEN) is not _UNSEEN
                for m in decision.members
            )
            if decision.version < current or (decision.members and done):
                return current, False
            if decision.version > current:
                raise Aborted(
                    f"this shard is at version {current}; the round decided for version "
                    f"{decision.version} needs the one for version {current} first (the SDK "
                    "applies the coordinator's last decision itself)",
                    reason="ROUND_OUT_OF_ORDER",
                    metadata={"version": current, "decision_version": decision.version},
                )
            gradients = []
            for member in sorted(decision.members, key=lambda m: m.worker_id):
                entry = self._prepared.get(member.worker_id)
                if (
                    entry is None
                    or entry.sequence != member.sequence
                    or entry.generation != store.generation
                    or (member.applied and entry.gradients is None)
                ):
                    raise FailedPrecondition(
                        f"the round for version {current} includes worker "
                        f"{member.worker_id!r}'s sequence {member.sequence}, which this shard "
                        "never held as prepared: the shards disagree (restore every shard "
                        "from one sharded snapshot)",
                        reason="ROUND_NOT_PREPARED",
                        metadata={"worker_id": member.worker_id, "sequence": member.sequence},
                    )
                if member.applied:
                    gradients.append(entry.gradients)
            version = self._apply_round(gradients)
            for member in decision.members:
                entry = self._prepared[member.worker_id]
                self._record(member.worker_id, member.sequence, entry.session, current)
            self._drop_prepared(current)
            if self._push_log is not None:
                self._push_log.write(
                    _push_entry(m.worker_id, m.sequence, version, applied=m.applied)
                    for m in sorted(decision.members, key=lambda m: m.worker_id)
                )
            partial = len(decision.members) < self.config.replicas
            self._rounds_completed += 1
            self._rounds_partial += int(partial)
            self._metrics.record_round("partial" if partial else "full")
            store.changed.notify_all()
            return version, True

    def hold(self, hold_s: float) -> int:
        """Apply no update for ``hold_s`` seconds (0: release now); the version held at.

        What a sharded snapshot needs: on the coordinator of a sync job no round closes
        (commits wait, deadlines are extended), so no shard can pass its version; on an
        async shard pushes wait before they apply. A lease: it ends by itself.
        """
        if not isinstance(hold_s, int | float) or not 0 <= hold_s <= 3600:
            raise InvalidArgument(
                f"hold_s must be in [0, 3600] seconds; got {hold_s!r}",
                violations=[("hold_s", "must be in [0, 3600]")],
            )
        with self._store.lock:
            self._check_open()
            self._hold_until = self._clock() + hold_s if hold_s else 0.0
            self._store.changed.notify_all()
            return self._store.version

    def _wait_unheld(self, deadline: float | None) -> None:
        """Wait (under the lock) while updates are held; DeadlineExceeded past ``deadline``."""
        while True:
            now = self._clock()
            if now >= self._hold_until:
                return
            if deadline is not None and now >= deadline:
                raise DeadlineExceeded(
                    "updates are held while a sharded snapshot is taken, and the deadline "
                    "passed while waiting; resend the push with the same sequence"
                )
            end = self._hold_until if deadline is None else min(self._hold_until, deadline)
            self._store.changed.wait(max(0.0, end - now))

    @property
    def last_decision(self) -> RoundDecision | None:
        """The coordinator's newest decision (None before its first round)."""
        with self._store.lock:
            return self._decisions[-1] if self._decisions else None

    def _decided(self, decision: RoundDecision) -> None:
        self._decisions.append(decision)
        del self._decisions[:-_RECENT_DECISIONS]
        self._drop_prepared(decision.version)

    def _drop_prepared(self, version: int) -> None:
        """Forget pushes prepared for rounds up to ``version`` (applied, or too late)."""
        self._prepared = {wid: p for wid, p in self._prepared.items() if p.base_version > version}

    def _decision_with(self, worker_id: str, sequence: int) -> RoundDecision | None:
        for decision in reversed(self._decisions):
            if any((m.worker_id, m.sequence) == (worker_id, sequence) for m in decision.members):
                return decision
        return None

    def _check_round_version(self, base_version: int) -> None:
        version = self._store.version
        if base_version != version:
            raise FailedPrecondition(
                f"the gradients were computed from version {base_version}; the open round is "
                f"for version {version}: pull and recompute",
                reason="STALE_BASE_VERSION",
                metadata={"base_version": base_version, "version": version},
            )

    def _require_model(self) -> None:
        if not self._store.has_model:
            raise NotFound("no model exists on this server; create one first", reason="NO_MODEL")

    # --- status, state, shutdown ---------------------------------------------------------
    def status(self) -> AggregatorStatus:
        with self._store.lock:
            with contextlib.suppress(Exception):  # already logged; status must still answer
                self._check_round_deadline()
            now = self._clock()
            round_ = self._open_round()
            pending = set(round_.contributions) if round_ is not None else set()
            pending |= set(self._stale_waiting)
            if self.shard_index:
                pending |= set(self._prepared)
            workers = [
                WorkerInfo(
                    worker_id=wid,
                    last_sequence=w.last_sequence,
                    pushes=w.pushes,
                    seconds_since_seen=now - w.last_seen if w.last_seen is not None else -1.0,
                    pending=wid in pending,
                    last_base_version=w.last_base_version,
                    duplicates=w.duplicates,
                )
                for wid, w in sorted(self._workers.items())
            ]
            return AggregatorStatus(
                rounds_completed=self._rounds_completed,
                rounds_aborted=self._rounds_aborted,
                rounds_partial=self._rounds_partial,
                pending_pushes=(len(round_.contributions) if round_ is not None else 0)
                + sum(self._stale_waiting.values())
                + (len(self._prepared) if self.shard_index else 0),
                workers=workers,
            )

    def export_state(self) -> dict[str, Any]:
        """The dedupe table, push counts and round counters (JSON-safe)."""
        with self._store.lock:
            return {
                "format_version": STATE_FORMAT_VERSION,
                "workers": {
                    wid: {
                        "last_sequence": w.last_sequence,
                        "pushes": w.pushes,
                        "clock": w.clock,
                        "session": w.session,
                        "recent": recent_to_ranges(w.recent),
                    }
                    for wid, w in sorted(self._workers.items())
                },
                "rounds_completed": self._rounds_completed,
                "rounds_aborted": self._rounds_aborted,
                "rounds_partial": self._rounds_partial,
            }

    def import_state(self, state: dict[str, Any]) -> None:
        """Replace the table (validated first); an open round is aborted (retryable)."""
        checked = check_aggregation_state(state)
        with self._store.lock:
            round_ = self._open_round()
            if round_ is not None:
                self._fail_round(
                    round_, Aborted("the server state was restored; pull and push again")
                )
            self._workers = {
                wid: _Worker(
                    info["last_sequence"],
                    info["pushes"],
                    info["clock"],
                    None,
                    recent_from_ranges(info["recent"]),
                    info["session"],
                )
                for wid, info in checked["workers"].items()
            }
            self._rounds_completed = checked["rounds_completed"]
            self._rounds_aborted = checked["rounds_aborted"]
            self._rounds_partial = checked["rounds_partial"]
            self._prepared.clear()
            self._decisions.clear()
            if self._push_log is not None:
                self._push_log.write([{"event": "restore", "version": self._store.version}])
            self._store.changed.notify_all()

    def close(self) -> None:
        """Abort the open round, wake every waiter with Unavailable; later pushes too."""
        with self._store.lock:
            self._closed = True
            round_ = self._open_round()
            if round_ is not None:
                self._fail_round(round_, Unavailable("the server is shutting down"))
            if self._push_log is not None:
                self._push_log.close()
            self._store.changed.notify_all()


def _push_entry(worker_id: str, sequence: int, version: int, *, applied: bool) -> dict[str, Any]:
    return {
        "event": "push",
        "worker_id": worker_id,
        "sequence": sequence,
        "version": version,
        "applied": applied,
    }
