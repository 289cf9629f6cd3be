"""Protobuf messages to and from the core's plain values, and request headers checked first.

A request's tensor headers are checked here against the limits and against the model's
variables (names, dtypes, shapes, from :meth:`ServerCore.variable_specs`) before any payload
buffer is allocated; replies are built from the core's dataclasses and arrays. Nothing here
changes state.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import weakref
from typing import Any

import numpy as np

from paramserve import wire
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from .aggregation import AggregationConfig, PushResult
from .aggregator import RoundDecision, RoundMember
from .core import CoreStatus, ModelDescription, Specs
from .errors import InvalidArgument, ParamServeError, limit_exceeded
from .limits import Limits
from .snapshots import SnapshotInfo


def server_version() -> str:
    """The installed paramserve version ("unknown" in a source checkout)."""
    try:
        return importlib.metadata.version("paramserve")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


# --- requests ----------------------------------------------------------------------------------
def check_sizes(headers: list[tpb.TensorHeader], limits: Limits, *, dense_only: bool) -> None:
    """Headers well formed, every tensor and the request within the configured limits."""
    if len(headers) > limits.max_variables:
        raise limit_exceeded(
            f"{len(headers)} tensors in one request, over the server's limit of "
            f"max_variables={limits.max_variables}",
            limit="max_variables",
            limit_value=limits.max_variables,
            requested=len(headers),
        )
    wire.check_headers(headers)
    total = 0
    for h in headers:
        if dense_only and h.layout != tpb.LAYOUT_DENSE:
            raise InvalidArgument(
                f"tensor {h.name!r}: only LAYOUT_DENSE is accepted here",
                violations=[(f"tensors[{h.name}].layout", "must be LAYOUT_DENSE")],
            )
        if h.byte_length > limits.max_tensor_bytes:
            raise limit_exceeded(
                f"tensor {h.name!r} is {h.byte_length} bytes, over the server's limit of "
                f"max_tensor_bytes={limits.max_tensor_bytes}",
                limit="max_tensor_bytes",
                limit_value=limits.max_tensor_bytes,
                requested=h.byte_length,
                variable=h.name,
            )
        total += h.byte_length
    if total > limits.max_request_bytes:
        raise limit_exceeded(
            f"request carries {total} payload bytes, over the server's limit of "
            f"max_request_bytes={limits.max_request_bytes}",
            limit="max_request_bytes",
            limit_value=limits.max_request_bytes,
            requested=total,
        )


def check_against(
    headers: list[tpb.TensorHeader],
    expected: Specs,
    *,
    what: str,
    unknown: type[ParamServeError],
    wire_dtype: int = tpb.DTYPE_UNSPECIFIED,
) -> None:
    """Every header names a known tensor with its dtype and shape (before allocating).

    ``wire_dtype`` (a push's opt-in, FLOAT16 or BFLOAT16) also lets a float32 variable's
    tensor arrive in that dtype; without it such a tensor is a DTYPE_MISMATCH.
    """
    compressed = wire_dtype_name(wire_dtype, "push.wire_dtype")
    for h in headers:
        if h.name not in expected:
            known = sorted(expected)
            listed = ", ".join(map(repr, known[:20])) + (" ..." if len(known) > 20 else "")
            raise unknown(
                f"unknown {what} {h.name!r}; expected one of: {listed}",
                reason="UNKNOWN_VARIABLE",
                metadata={"variable": h.name},
            )
        dtype, shape = expected[h.name]
        got_dtype = wire.dtype_name(h.dtype)
        if got_dtype != dtype and not (
            compressed is not None and got_dtype == compressed and dtype == "float32"
        ):
            hint = ""
            if dtype == "float32" and got_dtype in wire.WIRE_DTYPES:
                hint = (
                    f" (a {got_dtype} gradient for a float32 variable is accepted only when "
                    f"the push opts in with wire_dtype={got_dtype.upper()})"
                )
            raise InvalidArgument(
                f"{what} {h.name!r}: dtype {got_dtype} does not match the expected {dtype}" + hint,
                reason="DTYPE_MISMATCH",
                metadata={"variable": h.name, "expected": dtype, "got": got_dtype},
                violations=[(f"tensors[{h.name}].dtype", f"expected {dtype}")],
            )
        if tuple(h.shape) != tuple(shape):
            raise InvalidArgument(
                f"{what} {h.name!r}: shape {list(h.shape)} does not match the expected "
                f"{list(shape)}",
                reason="SHAPE_MISMATCH",
                metadata={"variable": h.name, "expected": list(shape), "got": list(h.shape)},
                violations=[(f"tensors[{h.name}].shape", f"expected {list(shape)}")],
            )


def wire_dtype_name(code: int, field: str) -> str | None:
    """The name of the wire dtype a request opted in to (None: none); INVALID_ARGUMENT for
    a code other than DTYPE_UNSPECIFIED, FLOAT16 and BFLOAT16."""
    try:
        dtype = wire.wire_dtype_of(code)
    except (ValueError, wire.WireError) as exc:
        raise InvalidArgument(str(exc), violations=[(field, "FLOAT16 or BFLOAT16")]) from None
    return None if dtype is None else dtype.name


def widened_on_arrival(headers: list[tpb.TensorHeader], specs: Specs) -> list[bool]:
    """For each header of a compressed push (checked against ``specs``): whether it is a
    dense tensor of a float32 variable arriving in the wire dtype, to be widened as it
    arrives (see ``wire.TensorAssembler``)."""
    return [
        h.layout == tpb.LAYOUT_DENSE
        and h.dtype in wire.WIRE_DTYPES.values()
        and specs[h.name][0] == "float32"
        for h in headers
    ]


def upcast_compressed(grads: dict[str, wire.TensorValue], specs: Specs) -> None:
    """Widen, in place, gradients that arrived in a wire dtype to their variable's float32
    (exact: every bfloat16 and float16 value is a float32 value, Inf and NaN included)."""
    for name, value in grads.items():
        values = value.values if isinstance(value, wire.SparseRows) else value
        if values.dtype != wire.COMPRESSIBLE and specs[name][0] == "float32":
            grads[name] = wire.cast_tensor(value, wire.COMPRESSIBLE)


def compressed_weights(
    tensors: dict[str, wire.TensorValue], specs: Specs, dtype: np.dtype
) -> dict[str, wire.TensorValue]:
    """The float32 weights among ``tensors`` rounded to the pull's wire ``dtype`` (copies);
    the others as they are."""
    return {
        n: wire.cast_tensor(v, dtype) if specs[n][0] == "float32" else v for n, v in tensors.items()
    }


class CompressedWeights(dict):
    """A whole model's weights rounded to a pull's wire dtype, in model order; ``runs`` as
    the store's ``Weights.runs``, their flat arrays the rounded ones (see
    ``wire.encoded_chunk_items``)."""

    whole = True
    runs: list[tuple[int, int, np.ndarray, list[int]]] = []


class _Rounded:
    """What :class:`WireWeights` keeps for one model and wire dtype: per float32 slab run,
    its flat buffer of the wire dtype and views of it per variable."""

    def __init__(self, specs: Specs, weights: Any, dtype: np.dtype) -> None:
        self.specs = specs
        self.dtype = dtype
        names = list(weights)
        # (live float32 flat, its rounded flat) per float32 run; runs for the reply.
        self.casts: list[tuple[np.ndarray, np.ndarray]] = []
        runs: list[tuple[int, int, np.ndarray, list[int]]] = []
        in_runs: set[int] = set()
        template: dict[str, Any] = dict(weights)
        for first, end, flat, starts in weights.runs:
            members = names[first:end]
            if flat.dtype != wire.COMPRESSIBLE or any(specs[n][0] != "float32" for n in members):
                runs.append((first, end, flat, starts))  # sent as it is
                continue
            rounded = np.empty(flat.shape, dtype)
            self.casts.append((flat, rounded))
            runs.append((first, end, rounded, [b // 2 for b in starts]))
            elements = [b // 4 for b in starts]
            for k, name in enumerate(members):
                template[name] = rounded[elements[k] : elements[k + 1]].reshape(weights[name].shape)
            in_runs.update(range(first, end))
        # Float32 variables outside the runs: rounded one by one, each reply.
        self.alone = [
            n for i, n in enumerate(names) if i not in in_runs and specs[n][0] == "float32"
        ]
        self.template = template
        self.runs = runs
        self.rounded_at: int | None = None  # the store's weight writes then (see WireWeights)
        self.headers: list[tpb.TensorHeader] | None = None


class WireWeights:
    """A whole model's weights rounded to a pull's wire dtype, each float32 slab run by one
    cast into a buffer kept for the next pull (bit for bit :func:`compressed_weights`), and
    their headers (the same list object each time, as :class:`WeightHeaders` hands out).

    Callers hold the store's lock from the call until they have serialized the weights: the
    buffers are reused by the next call. What is kept goes with the model's weights mapping
    (held weakly: a deleted or replaced model's buffers go with it)."""

    def __init__(self) -> None:
        self._weights: weakref.ref | None = None  # the mapping the buffers are for
        self._kept: dict[np.dtype, _Rounded] = {}

    def __call__(
        self,
        specs: Specs,
        tensors: dict[str, wire.TensorValue],
        dtype: np.dtype,
        writes: int | None = None,
    ) -> tuple[dict[str, wire.TensorValue], list[tpb.TensorHeader]]:
        """``tensors`` rounded to ``dtype`` (float32 ones) and their headers. ``writes``:
        the store's count of weight changes; a call with the count of the last rounding
        into the kept buffers (the stripes of one pull, say) finds them rounded already."""
        if not (getattr(tensors, "whole", False) and getattr(tensors, "runs", None)):
            rounded = compressed_weights(tensors, specs, dtype)
            return rounded, weight_headers(specs, rounded)
        if self._weights is None or self._weights() is not tensors:
            by_dtype: dict[np.dtype, _Rounded] = {}
            # (dropped with the mapping, as the model goes)
            self._weights = weakref.ref(tensors, lambda _, kept=by_dtype: kept.clear())
            self._kept = by_dtype
        kept = self._kept.get(dtype)
        if kept is None or kept.specs is not specs:
            kept = self._kept[dtype] = _Rounded(specs, tensors, dtype)
        if writes is None or kept.rounded_at != writes:
            for flat, rounded in kept.casts:
                if not wire.cast_into(flat, rounded):
                    np.copyto(rounded, flat, casting="unsafe")  # astype's bits, as _cast
            kept.rounded_at = writes
        out = CompressedWeights(kept.template)
        out.runs = kept.runs
        for name in kept.alone:
            out[name] = wire.cast_tensor(tensors[name], dtype)
        if kept.headers is None:
            kept.headers = weight_headers(specs, out)
        return out, kept.headers


def weight_headers(specs: Specs, tensors: dict[str, wire.TensorValue]) -> list[tpb.TensorHeader]:
    """Headers of ``tensors`` as they are (compressed weights: not the variables' dtypes)."""
    return [
        wire.sparse_header(n, v, specs[n][1])
        if isinstance(v, wire.SparseRows)
        else wire.header_for(n, v)
        for n, v in tensors.items()
    ]


def check_step_reply(sizes: dict[str, tuple[int, int]], limits: Limits) -> None:
    """The weights a Step returns (``{name: (payload bytes, rank)}``) fit one message."""
    total = wire.step_reply_bytes((n, size, rank) for n, (size, rank) in sizes.items())
    limit = limits.max_message_bytes
    if total > limit:
        raise limit_exceeded(
            f"the Step reply would carry about {total} bytes, over the server's limit of "
            f"max_message_bytes={limit}; use Push and Pull (streamed) for this model",
            limit="max_message_bytes",
            limit_value=limit,
            requested=total,
        )


def check_upload_size(size: int, limits: Limits, *, shards: int = 1) -> None:
    """An uploaded snapshot is within ``max_state_bytes`` (a whole sharded snapshot sent to
    be re-sharded: within ``shards`` times it, the job's state at this shard's limit)."""
    limit = limits.max_state_bytes * max(1, shards)
    if size > limit:
        whole = f" x {shards} shards" if shards > 1 else ""
        raise limit_exceeded(
            f"snapshot of {size} bytes is over the server's limit of "
            f"max_state_bytes={limits.max_state_bytes}{whole}",
            limit="max_state_bytes",
            limit_value=limit,
            requested=size,
        )


def weights_selection(
    request: pb.PullRequest,
) -> tuple[list[str] | None, dict[str, np.ndarray] | None]:
    """The ``(names, rows)`` of a weights pull: None names means all (or only the rows)."""
    rows: dict[str, np.ndarray] = {}
    for selection in request.rows:
        if selection.name in rows:
            raise InvalidArgument(f"rows of {selection.name!r} selected twice")
        rows[selection.name] = np.asarray(selection.rows, dtype=np.int64)
    wanted = list(dict.fromkeys([*request.names, *rows])) or None
    return wanted, rows or None


def unknown_scope(scope: int) -> str:
    """The message for a pull scope that is not one of the enum's."""
    return (
        f"unknown pull scope {scope}; expected PULL_SCOPE_WEIGHTS (0) or "
        "PULL_SCOPE_OPTIMIZER_STATE (1)"
    )


# --- tensors out -------------------------------------------------------------------------------
def dense_header(name: str, dtype: str, shape: tuple[int, ...]) -> tpb.TensorHeader:
    """The header of a whole tensor of this dtype and shape."""
    code = wire.dtype_to_proto(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return tpb.TensorHeader(name=name, dtype=code, shape=list(shape), byte_length=size)


def dense_headers(specs: Specs) -> list[tpb.TensorHeader]:
    """Headers of whole tensors described by ``specs``, in their order."""
    return [dense_header(name, dtype, shape) for name, (dtype, shape) in specs.items()]


class WeightHeaders:
    """Headers of the weights a read returns; the dense ones built once per model."""

    def __init__(self) -> None:
        self._specs: Specs | None = None
        self._dense: dict[str, tpb.TensorHeader] = {}
        self._all: list[tpb.TensorHeader] = []
        self._names: list[str] = []

    def __call__(
        self, specs: Specs, tensors: dict[str, wire.TensorValue]
    ) -> list[tpb.TensorHeader]:
        """The headers of ``tensors`` (whole variables or their rows) of a model's ``specs``.

        Every variable, whole, in the model's order (the usual pull) gets the same list
        object each time, so the caller can keep what it derives from it.
        """
        if specs is not self._specs:  # the core hands out one specs object per model
            self._all = dense_headers(specs)
            self._dense = {h.name: h for h in self._all}
            self._names = list(self._dense)
            self._specs = specs
        if getattr(tensors, "whole", False) or (
            len(tensors) == len(self._names)
            and list(tensors) == self._names
            and not any(type(v) is wire.SparseRows for v in tensors.values())
        ):
            return self._all
        dense = self._dense
        return [
            wire.sparse_header(n, v, specs[n][1]) if isinstance(v, wire.SparseRows) else dense[n]
            for n, v in tensors.items()
        ]


# --- replies -----------------------------------------------------------------------------------
def optimizer_json(config: dict[str, Any]) -> str:
    """An optimizer's serialization dict as the JSON text the wire carries."""
    return json.dumps(config, default=wire.json_default)


def aggregation_info(config: AggregationConfig) -> pb.AggregationInfo:
    """The aggregator's settings on the wire (the proto fields mirror the dataclass)."""
    return pb.AggregationInfo(**dataclasses.asdict(config))


def snapshot_info(info: SnapshotInfo) -> pb.SnapshotInfo:
    """A snapshot's id, version, size and creation time."""
    cut = info.cut
    return pb.SnapshotInfo(
        id=info.id,
        version=info.version,
        size_bytes=info.size_bytes,
        created_at=info.created_at,
        cut=None if cut is None else pb.SnapshotCut(**cut),
    )


def snapshot_cut(request: pb.CreateSnapshotRequest) -> dict[str, Any] | None:
    """The cut a CreateSnapshot asks for (None: a snapshot of this server alone)."""
    if not request.HasField("cut"):
        return None
    cut = request.cut
    if not cut.cut_id or len(cut.cut_id) > 128 or not 0 <= cut.shard_index < cut.shards:
        raise InvalidArgument(
            "cut needs a cut_id of 1 to 128 characters and 0 <= shard_index < shards; got "
            f"{cut.cut_id!r:.140}, {cut.shard_index}, {cut.shards}",
            violations=[("cut", "cut_id of 1 to 128 characters, 0 <= shard_index < shards")],
        )
    return {"cut_id": cut.cut_id, "shard_index": cut.shard_index, "shards": cut.shards}


def push_response(result: PushResult, *, reads_merged_items: bool = False) -> pb.PushResponse:
    """What became of a push (``reads_merged_items``: a Push's reply says it may merge)."""
    return pb.PushResponse(
        duplicate=result.duplicate,
        version=result.version,
        contributors=result.contributors,
        applied=result.applied,
        reads_merged_items=reads_merged_items,
    )


def describe_response(description: ModelDescription) -> pb.DescribeResponse:
    """The model's variables, optimizer, hyperparameters and optimizer state tensors."""
    return pb.DescribeResponse(
        model_name=description.model_name,
        variables=dense_headers(description.variables),
        optimizer_json=optimizer_json(description.optimizer),
        hyperparameters=description.hyperparameters,
        version=description.version,
        aggregation=aggregation_info(description.aggregation),
        optimizer_variables=dense_headers(description.optimizer_variables),
    )


def status_response(
    status: CoreStatus, *, received_bytes: int = 0, sent_bytes: int = 0
) -> pb.GetStatusResponse:
    """The server's version, rounds, workers, pending pushes, settings, state and the
    payload bytes it received and sent."""
    aggregator = status.aggregator
    workers = [
        pb.WorkerStatus(
            worker_id=w.worker_id,
            last_sequence=w.last_sequence,
            pushes=w.pushes,
            seconds_since_seen=w.seconds_since_seen,
            pending=w.pending,
            last_base_version=w.last_base_version,
            duplicates=w.duplicates,
        )
        for w in aggregator.workers
    ]
    return pb.GetStatusResponse(
        server_version=server_version(),
        has_model=status.has_model,
        version=status.version,
        rounds_completed=aggregator.rounds_completed,
        rounds_aborted=aggregator.rounds_aborted,
        rounds_partial=aggregator.rounds_partial,
        workers=workers,
        pending_pushes=aggregator.pending_pushes,
        aggregation=aggregation_info(status.aggregation),
        device=status.device,
        uptime_s=status.uptime_s,
        serving=status.serving,
        shard_index=status.shard_index,
        shards=status.shards,
        last_round=round_decision_message(status.last_round),
        received_bytes=received_bytes,
        sent_bytes=sent_bytes,
    )


def round_decision_message(decision: RoundDecision | None) -> pb.RoundDecision | None:
    """A sharded round's decision as its message (None stays unset)."""
    if decision is None:
        return None
    return pb.RoundDecision(
        version=decision.version,
        members=[
            pb.RoundMember(worker_id=m.worker_id, sequence=m.sequence, applied=m.applied)
            for m in decision.members
        ],
    )


def round_decision(message: pb.RoundDecision) -> RoundDecision:
    """The decision an ApplyRound carries."""
    return RoundDecision(
        message.version,
        tuple(RoundMember(m.worker_id, m.sequence, m.applied) for m in message.members),
    )
