"""The core service: one daemon's model, aggregation and snapshots, for any transport.

:class:`ServerCore` owns the model store (its lock and its condition), the aggregator and
the snapshot store, and offers each thing a client may ask as one operation: create,
describe, push, read, snapshot, restore, ... Each checks what it is given, takes the lock
as it needs, and either changes the state or refuses with a domain error
(:mod:`.errors`) having changed nothing; each reports to the metric hooks
(:class:`~.hooks.CoreMetrics`). Operations take and return plain values: names, dtype
names, shapes, NumPy arrays, :class:`~paramserve.wire.SparseRows`, the dataclasses below.

Tensor headers are not the core's: the gRPC layer (:mod:`.servicer`, :mod:`.streams`)
checks the headers of a request against :meth:`ServerCore.variable_specs` and the limits
before it allocates anything, receives the tensors, and calls the core with arrays; on the
way out it builds the headers from the arrays the core hands to its ``encode`` callback.
Nothing outside the core takes the store's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from paramserve.wire import TensorValue

from .aggregation import AggregationConfig, AggregatorStatus, PushResult
from .aggregator import Aggregator, RoundDecision
from .checkpoint_dir import TEMP_PREFIX, ModelIdentity
from .config import ServerConfig
from .errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .hooks import NO_METRICS, CoreMetrics
from .model import Model, ModelState, parse_optimizer
from .push_log import PushLog
from .reshard import ShardedSnapshotError, reshard_upload
from .settings import ConfigError
from .snapshots import (
    SnapshotInfo,
    SnapshotState,
    SnapshotStore,
    utc_now,
    write_snapshot_file,
)
from .store import CreateOutcome, ModelStore

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Tensors by name: (NumPy dtype name, shape), in the model's order.
Specs = dict[str, tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class ModelDescription:
    """The model at one version: its variables, optimizer and its state's tensors."""

    model_name: str
    variables: Specs
    optimizer: dict[str, Any]  # the Keras serialization dict
    hyperparameters: dict[str, float]
    version: int
    aggregation: AggregationConfig
    optimizer_variables: Specs


@dataclass(frozen=True)
class ReshardRequest:
    """An upload of a whole sharded snapshot to be re-placed for this job (UploadSnapshot's
    ``header.reshard``): the source manifest, this job's shape, the new cut's id."""

    manifest: bytes
    shards: int
    shard_index: int
    cut_id: str
    split_threshold_bytes: int = 0  # 0: the source job's


def _file_blocks(path: Path, block: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of ``path`` in blocks of ``block``."""
    with path.open("rb") as f:
        while data := f.read(block):
            yield data


@dataclass(frozen=True)
class CoreStatus:
    """The server at one moment: model version, aggregation progress, device, uptime."""

    has_model: bool
    version: int
    aggregation: AggregationConfig
    aggregator: AggregatorStatus
    device: str
    uptime_s: float
    serving: bool
    shard_index: int = 0
    shards: int = 1
    last_round: RoundDecision | None = None  # a sharded sync job's coordinator only


@dataclass
class ServerCore:
    """The transport-neutral service of one daemon (see the module docstring)."""

    store: ModelStore
    aggregator: Aggregator
    snapshots: SnapshotStore | None
    config: ServerConfig
    metrics: CoreMetrics = NO_METRICS
    started_at: float = field(default_factory=time.monotonic)
    # Cleared at shutdown: pushes and every state-changing call answer UNAVAILABLE.
    accepting: threading.Event = field(default_factory=threading.Event)
    _snapshot_lock: threading.Lock = field(default_factory=threading.Lock)
    # (store generation, variable specs): one specs object per model.
    _specs: tuple[int, Specs] = field(default_factory=lambda: (-1, {}), init=False, repr=False)

    def __post_init__(self) -> None:
        self.accepting.set()
        if self.snapshots is not None:
            # The checkpoint directory records every change of the model before it happens,
            # so --resume only resumes snapshots of the model served at the time.
            self.store.on_model_change = self._record_model

    def _record_model(self, model: Model | None, reason: str) -> None:
        assert self.snapshots is not None
        identity = None if model is None else ModelIdentity.of_model(model)
        self.snapshots.record_model(identity, reason=reason)

    # --- what every call checks first ----------------------------------------------------
    def require_accepting(self) -> None:
        """Unavailable once the server began shutting down (state changes are refused)."""
        if not self.accepting.is_set():
            raise Unavailable("the server is shutting down; retry against another instance")

    def require_model(self) -> None:
        """NotFound (NO_MODEL) unless a model exists."""
        if not self.store.has_model:
            raise NotFound(
                "no model on this server: create one with CreateModel first", reason="NO_MODEL"
            )

    def require_snapshots(self) -> SnapshotStore:
        """The snapshot store; FailedPrecondition when snapshots are disabled."""
        if self.snapshots is None:
            raise FailedPrecondition(
                "snapshots are disabled on this server: start it with --checkpoint-dir DIR"
            )
        return self.snapshots

    # --- the model -----------------------------------------------------------------------
    def parse_optimizer(self, text: str) -> dict[str, Any] | str:
        """The optimizer a create asks for (JSON or a name; empty: the server's default)."""
        return parse_optimizer(text.strip() or self.config.optimizer)

    def create_model(
        self, name: str, optimizer: dict[str, Any] | str, variables: dict[str, np.ndarray]
    ) -> tuple[CreateOutcome, int]:
        """Create the model (or find the same definition): the outcome and the version."""
        outcome = self.store.create_model(name, optimizer, variables)
        version = self.store.version
        self.metrics.set_model_version(version)
        logger.info("model %r %s", name, "created" if outcome.created else "already existed")
        return outcome, version

    def delete_model(self) -> None:
        """Drop the model and its optimizer state; NotFound when there is none."""
        self.store.delete_model()
        logger.info("model deleted")

    def describe(self) -> ModelDescription:
        """The model, its optimizer and hyperparameters, all at one version."""
        with self.store.lock:
            self.require_model()
            return ModelDescription(
                model_name=self.store.model_name,
                variables=self.variable_specs(),
                optimizer=self.store.optimizer_config(),
                hyperparameters=self.store.hyperparameters(),
                version=self.store.version,
                aggregation=self.aggregator.config,
                optimizer_variables=self.store.optimizer_specs(),
            )

    def set_hyperparameters(
        self, values: Mapping[str, float]
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Change hyperparameters live (all checked first): the new values and config."""
        self.require_model()
        with self.store.lock:
            hyperparameters = self.store.set_hyperparameters(dict(values))
            return hyperparameters, self.store.optimizer_config()

    def variable_specs(self) -> Specs:
        """The variables' dtypes and shapes, one object per model (cached per generation)."""
        with self.store.lock:
            self.require_model()
            generation = self.store.generation
            if self._specs[0] != generation:
                specs = {s.name: (s.dtype, tuple(s.shape)) for s in self.store.specs()}
                self._specs = (generation, specs)
            return self._specs[1]

    def optimizer_specs(self) -> Specs:
        """The optimizer state's tensors, what :meth:`set_optimizer_state` takes."""
        with self.store.lock:
            self.require_model()
            return self.store.optimizer_specs()

    # --- training ------------------------------------------------------------------------
    @property
    def checks_finite(self) -> bool:
        """Whether pushes are checked for NaN and Inf (the non-finite policy is not allow)."""
        return self.store.nonfinite != "allow"

    def push(
        self,
        worker_id: str,
        sequence: int,
        base_version: int,
        grads: dict[str, TensorValue],
        *,
        session: str = "",
        timeout_s: float | None = None,
    ) -> PushResult:
        """Apply a push exactly once, or join the open sync round and wait for it to close."""
        self.metrics.observe_staleness(max(0, self.store.version - base_version))
        start = time.perf_counter()
        try:
            result = self.aggregator.push(
                worker_id, sequence, base_version, grads, session=session, timeout_s=timeout_s
            )
        finally:  # aborted and timed-out waits count too
            self.metrics.observe_round_wait(time.perf_counter() - start)
        self.metrics.record_push(
            duplicate=result.duplicate, applied=result.applied, version=result.version
        )
        return result

    def prepare(
        self,
        worker_id: str,
        sequence: int,
        base_version: int,
        grads: dict[str, TensorValue],
        *,
        session: str = "",
    ) -> PushResult:
        """Hold a sharded sync push for its commit (see :meth:`Aggregator.prepare`)."""
        return self.aggregator.prepare(worker_id, sequence, base_version, grads, session=session)

    def commit_round(
        self,
        worker_id: str,
        sequence: int,
        base_version: int,
        *,
        session: str = "",
        skipped: bool = False,
        timeout_s: float | None = None,
    ) -> tuple[PushResult, RoundDecision | None]:
        """Commit a prepared push into the coordinator's round and wait for the round."""
        start = time.perf_counter()
        try:
            result, decision = self.aggregator.commit(
                worker_id,
                sequence,
                base_version,
                session=session,
                skipped=skipped,
                timeout_s=timeout_s,
            )
        finally:
            self.metrics.observe_round_wait(time.perf_counter() - start)
        self.metrics.record_push(
            duplicate=result.duplicate, applied=result.applied, version=result.version
        )
        return result, decision

    def apply_round(self, decision: RoundDecision) -> tuple[int, bool]:
        """Apply the coordinator's decision on this shard: ``(version, applied now)``."""
        version, applied = self.aggregator.apply_decision(decision)
        if applied:
            self.metrics.set_model_version(version)
        return version, applied

    def read_sizes(
        self, names: list[str] | None, rows: dict[str, np.ndarray] | None
    ) -> dict[str, tuple[int, int]]:
        """``{name: (payload bytes, rank)}`` a read would return; what it would raise."""
        return self.store.read_sizes(names, rows)

    def read_weights(
        self,
        names: list[str] | None,
        rows: dict[str, np.ndarray] | None,
        encode: Callable[[Specs, dict[str, TensorValue]], T],
    ) -> tuple[int, T]:
        """The version, and ``encode(variable specs, weights)`` of the weights at it.

        ``names`` (None: all, or only the ``rows`` selections) and ``rows`` as in
        :meth:`ModelStore.read`. ``encode`` runs under the lock on the live host arrays and
        must copy what it keeps (it serializes them): one copy of each tensor, no more.
        """
        with self.store.lock:
            specs = self.variable_specs()
            return self.store.read_with(lambda tensors: encode(specs, tensors), names, rows)

    def wait_for_version(self, min_version: int, timeout_s: float | None) -> int:
        """Block until the model reaches ``min_version`` (DeadlineExceeded, Unavailable)."""
        return self.store.wait_for_version(min_version, timeout_s)

    def optimizer_state(self) -> tuple[int, list[tuple[str, np.ndarray]]]:
        """The version and host copies of the optimizer state, in optim_core order."""
        self.require_model()
        return self.store.optimizer_state()

    def set_optimizer_state(self, arrays: dict[str, np.ndarray]) -> int:
        """Replace every optimizer variable (all checked first); the version."""
        version = self.store.set_optimizer_state(arrays)
        self.metrics.set_model_version(version)
        return version

    def model_version(self) -> int | None:
        """The model's version; None when there is no model."""
        with self.store.lock:
            return self.store.version if self.store.has_model else None

    def status(self) -> CoreStatus:
        """Version, aggregation progress and serving state, at one moment."""
        with self.store.lock:
            return CoreStatus(
                has_model=self.store.has_model,
                version=self.store.version,
                aggregation=self.aggregator.config,
                aggregator=self.aggregator.status(),
                device=self.store.device,
                uptime_s=time.monotonic() - self.started_at,
                serving=self.accepting.is_set(),
                shard_index=self.config.shard_index,
                shards=self.config.shards,
                last_round=self.aggregator.last_decision,
            )

    # --- snapshots -----------------------------------------------------------------------
    def hold_updates(self, hold_s: float) -> int:
        """Apply no update for ``hold_s`` seconds (0 releases); the version held at."""
        return self.aggregator.hold(hold_s)

    def take_snapshot(
        self,
        *,
        trigger: str,
        cut: dict[str, Any] | None = None,
        at_version: int = 0,
        timeout_s: float | None = None,
    ) -> SnapshotInfo:
        """Copy model and aggregation state at one version (under the lock), then write it.

        ``cut`` (``cut_id``, ``shard_index``, ``shards``) marks the file as this shard's
        part of a sharded snapshot, taken at ``at_version`` (waited for within ``timeout_s``;
        FailedPrecondition once past it).
        """
        snapshots = self.require_snapshots()
        if cut is not None:
            if (cut["shard_index"], cut["shards"]) != (self.config.shard_index, self.config.shards):
                raise FailedPrecondition(
                    f"a snapshot of shard {cut['shard_index']} of {cut['shards']} was asked of "
                    f"shard {self.config.shard_index} of {self.config.shards}",
                    reason="SHARD_MISMATCH",
                )
            if at_version > 0:
                self.store.wait_for_version(at_version, timeout_s)
        with self._snapshot_lock, self.metrics.time_snapshot(trigger):
            with self.store.lock:
                if not self.store.has_model:
                    raise NotFound(
                        "no model to snapshot: create one with CreateModel first",
                        reason="NO_MODEL",
                    )
                if at_version > 0 and self.store.version != at_version:
                    raise FailedPrecondition(
                        f"the sharded snapshot is cut at version {at_version}, and this shard "
                        f"is at version {self.store.version} already: take it again (hold "
                        "updates first with HoldUpdates)",
                        metadata={"version": self.store.version, "at_version": at_version},
                    )
                model = self.store.export_state()
                aggregation = self.aggregator.export_state()
                # A no-op unless the record is missing (a directory of an older paramserve).
                snapshots.record_model(ModelIdentity.of_state(model), reason="snapshot")
            info = snapshots.save(
                SnapshotState(model=model, aggregation=aggregation, created_at=utc_now(), cut=cut)
            )
            self.metrics.set_snapshot_size(info.size_bytes)
        logger.info(
            "snapshot %s written (version %d, %d bytes)",
            info.id,
            info.version,
            info.size_bytes,
            extra={
                "event": "snapshot_written",
                "snapshot_id": info.id,
                "version": info.version,
                "size_bytes": info.size_bytes,
                "trigger": trigger,
            },
        )
        return info

    def list_snapshots(self) -> list[SnapshotInfo]:
        """The snapshots on disk, oldest first."""
        return self.require_snapshots().list()

    def snapshot_path(self, snapshot_id: str) -> Path:
        """The file of a snapshot (NotFound, or InvalidArgument for a malformed id)."""
        return self.require_snapshots().path(snapshot_id)

    def _check_same_definition(self, model: ModelState) -> None:
        """Refuse to replace a live model with a snapshot of a different model definition.

        Workers of the live model would otherwise find their variables gone or reshaped;
        an empty server accepts any valid snapshot, and hyperparameter changes still restore.
        """
        if not self.store.has_model:
            return
        live = [(s.name, s.dtype, tuple(s.shape)) for s in self.store.specs()]
        snap = [(n, a.dtype.name, tuple(a.shape)) for n, a in model.variables.items()]
        if model.model_name != self.store.model_name or live != snap:
            raise FailedPrecondition(
                "the snapshot holds a different model definition: model "
                f"{model.model_name!r} with variables "
                f"{[f'{n} {d}{list(sh)}' for n, d, sh in snap]}; this server holds model "
                f"{self.store.model_name!r} with {[f'{n} {d}{list(sh)}' for n, d, sh in live]}: "
                "delete the model first (DeleteModel) to load a different one"
            )

    def restore_snapshot(self, snapshot_id: str, *, validate_only: bool = False) -> SnapshotInfo:
        """Load and fully validate a snapshot, then swap it in under the lock (with
        ``validate_only``, only load, check and check it fits the live model)."""
        snapshots = self.require_snapshots()
        state = snapshots.load(snapshot_id)  # validates everything before we touch live state
        path = snapshots.path(snapshot_id)
        info = SnapshotInfo(
            snapshot_id, state.model.version, path.stat().st_size, "", path, state.cut
        )
        if validate_only:
            with self.store.lock:
                self._check_same_definition(state.model)
            return dataclasses.replace(info, created_at=state.created_at)
        return self.restore_loaded(info, state)

    def restore_loaded(self, info: SnapshotInfo, state: SnapshotState) -> SnapshotInfo:
        """Swap in a snapshot already loaded and validated (``state``, read from ``info``)."""
        with self.store.lock:
            self._check_same_definition(state.model)
            self.store.import_state(state.model)
            self.aggregator.import_state(state.aggregation)
        self.metrics.set_model_version(state.model.version)
        logger.info(
            "restored snapshot %s (version %d)",
            info.id,
            state.model.version,
            extra={
                "event": "snapshot_restored",
                "snapshot_id": info.id,
                "version": state.model.version,
            },
        )
        return dataclasses.replace(
            info, version=state.model.version, created_at=state.created_at, cut=state.cut
        )

    def upload_snapshot(
        self,
        chunks: Iterator[bytes],
        *,
        size_bytes: int,
        restore: bool,
        reshard: ReshardRequest | None = None,
    ) -> tuple[SnapshotInfo, bool]:
        """Store an uploaded snapshot and, if asked, restore it: ``(info, restored)``.

        With ``reshard``, ``chunks`` are a whole sharded snapshot of another job size and
        what is stored is this shard's part of it re-placed for this job (see
        :func:`.reshard.reshard_upload`). A refused restore (another model definition, a
        state the store refuses, shutdown) removes the file again, unless an identical one
        was there before the upload.
        """
        snapshots = self.require_snapshots()
        part: Path | None = None
        if reshard is not None:
            part = self._resharded_part(snapshots.directory, chunks, size_bytes, reshard)
            size_bytes = part.stat().st_size
            chunks = _file_blocks(part)
        try:
            return self._store_upload(snapshots, chunks, size_bytes, restore)
        finally:
            if part is not None:
                part.unlink(missing_ok=True)

    def _resharded_part(
        self, directory: Path, chunks: Iterator[bytes], size_bytes: int, request: ReshardRequest
    ) -> Path:
        """This shard's part of an uploaded sharded snapshot, written to a private file in
        ``directory`` for the caller to import and remove."""
        config = self.config
        if (request.shards, request.shard_index) != (config.shards, config.shard_index):
            raise InvalidArgument(
                f"the re-sharded upload is for shard {request.shard_index} of {request.shards}, "
                f"and this server is shard {config.shard_index} of {config.shards}",
                violations=[("header.reshard", "shards and shard_index must be this server's")],
            )
        try:
            state = reshard_upload(
                chunks,
                size_bytes=size_bytes,
                manifest=request.manifest,
                shards=request.shards,
                shard_index=request.shard_index,
                cut_id=request.cut_id,
                split_threshold_bytes=request.split_threshold_bytes or None,
                work_dir=directory,
            )
        except ShardedSnapshotError as exc:
            raise InvalidArgument(
                f"the uploaded sharded snapshot cannot be re-sharded: {exc}",
                reason="SNAPSHOT_INVALID",
            ) from None
        path = directory / f"{TEMP_PREFIX}reshard-{uuid.uuid4().hex}.part"
        write_snapshot_file(path, state)
        return path

    def _store_upload(
        self, snapshots: SnapshotStore, chunks: Iterator[bytes], size_bytes: int, restore: bool
    ) -> tuple[SnapshotInfo, bool]:
        with snapshots.importing(chunks, size_bytes=size_bytes) as upload:
            if not restore:
                return upload.info, False
            if not self.accepting.is_set():
                raise Unavailable(
                    "the server began shutting down during the upload: the snapshot was "
                    "neither restored nor kept; upload it again to the next server"
                )
            return self.restore_loaded(upload.info, upload.state), True

    def resume(self) -> SnapshotInfo | None:
        """Restore the snapshot the checkpoint directory's rules pick (``--resume``).

        None when there is nothing to resume; StartupRefused when no snapshot may be.
        """
        snapshots = self.require_snapshots()
        chosen = snapshots.resume_candidate()
        if chosen is None:
            logger.info(
                "resume: no snapshot to resume in %s; starting empty",
                snapshots.directory,
                extra={"event": "resume_empty"},
            )
            return None
        info = self.restore_loaded(*chosen)
        logger.info(
            "resumed from snapshot %s at version %d",
            info.id,
            info.version,
            extra={"event": "resumed", "snapshot_id": info.id, "version": info.version},
        )
        return info

    # --- the end, in the order a shutdown takes it ------------------------------------
    def stop_accepting(self) -> None:
        """Refuse pushes and every state-changing call from now on (UNAVAILABLE)."""
        self.accepting.clear()

    def close_rounds(self) -> None:
        """Abort the open sync round (its pushers retry elsewhere) and refuse later pushes."""
        self.aggregator.close()

    def end_waits(self) -> None:
        """Wake pulls waiting for a version: they and later waits answer UNAVAILABLE."""
        self.store.close()

    def release_directory(self) -> None:
        """Unlock the checkpoint directory (another daemon may take it)."""
        if self.snapshots is not None:
            self.snapshots.close()

    def close(self) -> None:
        """All of the above at once (a daemon that failed to start)."""
        self.stop_accepting()
        self.close_rounds()
        self.end_waits()
        self.release_directory()


def build_core(config: ServerConfig, metrics: CoreMetrics = NO_METRICS) -> ServerCore:
    """The core of a daemon configured by ``config``, reporting to ``metrics``.

    With a checkpoint directory it is locked first (StartupRefused if another daemon has
    it) and cleaned of an earlier run's temporary files.
    """
    try:
        store = ModelStore(device=config.device, nonfinite=config.nonfinite, limits=config.limits)
    except RuntimeError as exc:  # --device gpu without a usable GPU
        raise ConfigError(f"`device`: {exc}") from None
    snapshots = None
    if config.checkpoint_dir is not None:
        snapshots = SnapshotStore(
            config.checkpoint_dir, keep_last=config.keep_snapshots, exclusive=True
        )
    try:
        aggregator = Aggregator(
            store,
            config.aggregation,
            push_log=PushLog(config.push_log) if config.push_log is not None else None,
            metrics=metrics,
            shard_index=config.shard_index,
            shards=config.shards,
        )
    except BaseException:
        if snapshots is not None:
            snapshots.close()  # another daemon may have the directory now
        raise
    return ServerCore(
        store=store, aggregator=aggregator, snapshots=snapshots, config=config, metrics=metrics
    )
