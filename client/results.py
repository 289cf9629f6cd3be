"""Plain Python results of SDK calls, converted from the protobuf responses in one place."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from paramserve.wire import dtype_from_name, dtype_name
from paramserve.wire.partition import Layout


@dataclass(frozen=True)
class TensorSpec:
    """Name, NumPy dtype name and shape of a model or optimizer variable."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return dtype_from_name(self.dtype)

    @classmethod
    def from_proto(cls, header: tpb.TensorHeader) -> TensorSpec:
        return cls(header.name, dtype_name(header.dtype), tuple(header.shape))


@dataclass(frozen=True)
class AggregationInfo:
    """How the server combines pushes: mode, replicas, reduction, deadlines, staleness."""

    mode: str
    replicas: int
    reduction: str
    round_timeout_s: float
    deadline_policy: str
    max_staleness: int

    @classmethod
    def from_proto(cls, info: pb.AggregationInfo) -> AggregationInfo:
        return cls(**{f.name: getattr(info, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class ModelDescription:
    """The model on the server: variables in model order, optimizer, hyperparameters."""

    model_name: str
    variables: list[TensorSpec]
    optimizer: dict[str, Any]
    hyperparameters: dict[str, float]
    version: int
    optimizer_variables: list[TensorSpec]
    aggregation: AggregationInfo
    # A sharded job's placement of every variable (None: one server).
    layout: Layout | None = None

    @property
    def variable_names(self) -> list[str]:
        return [v.name for v in self.variables]

    def spec(self, name: str) -> TensorSpec | None:
        """The spec of variable ``name``, or None if the model has no such variable."""
        return self._specs_by_name.get(name)

    @functools.cached_property
    def _specs_by_name(self) -> dict[str, TensorSpec]:
        return {v.name: v for v in self.variables}

    @classmethod
    def from_proto(cls, r: pb.DescribeResponse) -> ModelDescription:
        return cls(
            model_name=r.model_name,
            variables=[TensorSpec.from_proto(h) for h in r.variables],
            optimizer=json.loads(r.optimizer_json) if r.optimizer_json else {},
            hyperparameters=dict(r.hyperparameters),
            version=r.version,
            optimizer_variables=[TensorSpec.from_proto(h) for h in r.optimizer_variables],
            aggregation=AggregationInfo.from_proto(r.aggregation),
        )


@dataclass(frozen=True)
class CreateModelResult:
    """``created`` is False when an identical model already existed (a no-op);
    ``values_match`` is False when the server's weights differ from the values sent (pull
    them before computing gradients)."""

    created: bool
    version: int
    values_match: bool = True


@dataclass(frozen=True)
class PushResult:
    """Outcome of one push: ``version`` after it took effect (sync: after its round closed)."""

    duplicate: bool
    version: int
    contributors: int
    sequence: int
    # False when the server acknowledged the push without applying it: a duplicate, or
    # dropped by its non-finite policy "skip".
    applied: bool


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    last_sequence: int
    pushes: int
    seconds_since_seen: float
    pending: bool
    last_base_version: int = 0
    duplicates: int = 0

    @classmethod
    def from_proto(cls, w: pb.WorkerStatus) -> WorkerStatus:
        return cls(
            w.worker_id,
            w.last_sequence,
            w.pushes,
            w.seconds_since_seen,
            w.pending,
            w.last_base_version,
            w.duplicates,
        )


@dataclass(frozen=True)
class ServerStatus:
    """Version, round counters, workers and aggregation settings of a server."""

    server_version: str
    has_model: bool
    version: int
    rounds_completed: int
    rounds_aborted: int
    rounds_partial: int
    workers: list[WorkerStatus]
    pending_pushes: int
    aggregation: AggregationInfo
    device: str
    uptime_s: float
    serving: bool
    received_bytes: int = 0
    sent_bytes: int = 0
    shard_index: int = 0
    shards: int = 1
    # A sharded job: each shard's own status, in shard order (this object sums them up).
    shard_statuses: list[ServerStatus] | None = None

    def worker(self, worker_id: str) -> WorkerStatus | None:
        """The entry for ``worker_id``, or None if the server has not seen that worker."""
        return next((w for w in self.workers if w.worker_id == worker_id), None)

    @classmethod
    def from_proto(cls, r: pb.GetStatusResponse) -> ServerStatus:
        return cls(
            server_version=r.server_version,
            has_model=r.has_model,
            version=r.version,
            rounds_completed=r.rounds_completed,
            rounds_aborted=r.rounds_aborted,
            rounds_partial=r.rounds_partial,
            workers=[WorkerStatus.from_proto(w) for w in r.workers],
            pending_pushes=r.pending_pushes,
            aggregation=AggregationInfo.from_proto(r.aggregation),
            device=r.device,
            uptime_s=r.uptime_s,
            serving=r.serving,
            received_bytes=r.received_bytes,
            sent_bytes=r.sent_bytes,
            shard_index=r.shard_index,
            shards=r.shards or 1,
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot on the server's disk; ``created_at`` is RFC 3339 UTC.

    ``cut_id`` names the sharded snapshot a shard's file belongs to (empty otherwise). A
    sharded job's snapshot has its ``cut_id`` as ``id``, the sum of its files' sizes, and
    each shard's own snapshot in ``shard_snapshots`` (shard order).
    """

    id: str
    version: int
    size_bytes: int
    created_at: str
    cut_id: str = ""
    shard_snapshots: tuple[SnapshotInfo, ...] = ()

    @classmethod
    def from_proto(cls, s: pb.SnapshotInfo) -> SnapshotInfo:
        return cls(s.id, s.version, s.size_bytes, s.created_at, s.cut.cut_id)


class Tensors(dict):
    """Tensors by name, in the order the server sent them, plus the model ``version``.

    ``push_result`` is set by :meth:`~paramserve.client.Client.step` (the outcome of the
    step's push); None for plain pulls.
    """

    def __init__(
        self, items: Any = (), *, version: int, push_result: PushResult | None = None
    ) -> None:
        super().__init__(items)
        self.version = version
        self.push_result = push_result

    def __repr__(self) -> str:
        return f"Tensors(version={self.version}, {super().__repr__()})"
