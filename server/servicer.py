"""The ParameterServer gRPC servicer: converts messages to core calls and errors to status codes.

It holds no training logic. Requests become calls on the :class:`ServerCore` objects (store,
aggregator, snapshots); domain errors (``ParamServeError.code``), malformed streams
(``WireError``) and anything unexpected are mapped to gRPC status codes in one place,
:func:`_rpc`. Tensor streams are checked (headers, sizes, names, dtypes, shapes against the
model) before any payload buffer is allocated.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.metadata
import inspect
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from paramserve import wire
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb

from .aggregator import AggregationConfig, Aggregator
from .checkpoint_dir import ModelIdentity
from .config import ServerConfig
from .errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ParamServeError,
    Unavailable,
    limit_exceeded,
)
from .gradients import FiniteChecked, FiniteScan
from .metrics import ServerMetrics
from .model import Model
from .snapshots import SnapshotInfo, SnapshotState, SnapshotStore
from .status import grpc_status, status_code
from .store import ModelState, ModelStore

logger = logging.getLogger(__name__)

# Payload per outgoing message: a chunk less headroom for framing, so that clients with gRPC's
# default 4 MiB receive limit can read every message (and never above max_message_bytes).
_FRAMING_HEADROOM_BYTES = 16 << 10
OUT_CHUNK_BYTES = wire.CHUNK_BYTES - _FRAMING_HEADROOM_BYTES
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.>-]*$")
T = TypeVar("T")


def server_version() -> str:
    try:
        return importlib.metadata.version("paramserve")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def _utc_now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class ServerCore:
    """The transport-neutral objects of one daemon, plus snapshot orchestration."""

    store: ModelStore
    aggregator: Aggregator
    snapshots: SnapshotStore | None
    config: ServerConfig
    metrics: ServerMetrics
    started_at: float = field(default_factory=time.monotonic)
    # Cleared at shutdown: pushes and every state-changing call answer UNAVAILABLE.
    accepting: threading.Event = field(default_factory=threading.Event)
    _snapshot_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def require_snapshots(self) -> SnapshotStore:
        if self.snapshots is None:
            raise FailedPrecondition(
                "snapshots are disabled on this server: start it with --checkpoint-dir DIR"
            )
        return self.snapshots

    def take_snapshot(self, *, trigger: str) -> SnapshotInfo:
        """Copy model and aggregation state at one version (under the lock), then write it."""
        snapshots = self.require_snapshots()
        with self._snapshot_lock, self.metrics.time_snapshot(trigger):
            with self.store.lock:
                if not self.store.has_model:
                    raise NotFound(
                        "no model to snapshot: create one with CreateModel first",
                        reason="NO_MODEL",
                    )
                model = self.store.export_state()
                aggregation = self.aggregator.export_state()
                # A no-op unless the record is missing (a directory of an older paramserve).
                snapshots.record_model(ModelIdentity.of_state(model), reason="snapshot")
            info = snapshots.save(
                SnapshotState(model=model, aggregation=aggregation, created_at=_utc_now_rfc3339())
            )
            self.metrics.snapshot_size_bytes.set(info.size_bytes)
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

    def restore_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        """Load and fully validate a snapshot, then swap it in under the lock."""
        snapshots = self.require_snapshots()
        state = snapshots.load(snapshot_id)  # validates everything before we touch live state
        path = snapshots.path(snapshot_id)
        info = SnapshotInfo(snapshot_id, state.model.version, path.stat().st_size, "", path)
        return self.restore_loaded(info, state)

    def restore_loaded(self, info: SnapshotInfo, state: SnapshotState) -> SnapshotInfo:
        """Swap in a snapshot already loaded and validated (``state``, read from ``info``)."""
        with self.store.lock:
            self._check_same_definition(state.model)
            self.store.import_state(state.model)
            self.aggregator.import_state(state.aggregation)
        self.metrics.model_version.set(state.model.version)
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
        return dataclasses.replace(info, version=state.model.version, created_at=state.created_at)

    def upload_snapshot(
        self, chunks: Iterator[bytes], *, size_bytes: int, restore: bool
    ) -> tuple[SnapshotInfo, bool]:
        """Store an uploaded snapshot and, if asked, restore it: ``(info, restored)``.

        A refused restore (another model definition, a state the store refuses, shutdown)
        removes the file again, unless an identical one was there before the upload.
        """
        snapshots = self.require_snapshots()
        with snapshots.importing(chunks, size_bytes=size_bytes) as upload:
            if not restore:
                return upload.info, False
            if not self.accepting.is_set():
                raise Unavailable(
                    "the server began shutting down during the upload: the snapshot was "
                    "neither restored nor kept; upload it again to the next server"
                )
            return self.restore_loaded(upload.info, upload.state), True


def _remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else remaining


def _classify(exc: BaseException, method: str) -> grpc.Status:
    """The status (code, message, google.rpc.Status details) for an exception.

    The one place errors are mapped: see :func:`paramserve.server.status.grpc_status`.
    """
    return grpc_status(exc, method)


def _rpc(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a handler (plain or generator) so errors become status codes and get counted."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        def fail(self: ParameterServerServicer, context: grpc.ServicerContext, exc: Exception):
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                self._metrics.record_rpc(method, "CANCELLED")  # the client went away
                raise exc
            status = _classify(exc, method)
            self._metrics.record_rpc(method, status.code.name)
            context.abort_with_status(status)

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream_handler(self, request, context):
                try:
                    yield from fn(self, _decoded(request), context)
                except Exception as exc:
                    fail(self, context, exc)
                else:
                    self._metrics.record_rpc(method, "OK")

            return stream_handler

        @functools.wraps(fn)
        def handler(self, request, context):
            try:
                response = fn(self, _decoded(request), context)
            except Exception as exc:
                fail(self, context, exc)
            self._metrics.record_rpc(method, "OK")
            return response

        return handler

    return decorate


class _Undecodable:
    """A request message that protobuf could not parse: answered INVALID_ARGUMENT.

    gRPC answers a deserializer exception with INTERNAL, so the deserializers return this
    instead and :func:`_decoded` raises in the handler.
    """

    def __init__(self, message_cls: Any, error: Exception) -> None:
        self.message = f"malformed {message_cls.DESCRIPTOR.name} message: {error}"


def _tolerant(deserialize: Callable[[bytes], Any], message_cls: Any) -> Callable[[bytes], Any]:
    def tolerant(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return _Undecodable(message_cls, exc)

    return tolerant


def _decoded(request: Any) -> Any:
    """The request, or its stream with each item checked; InvalidArgument if one was malformed."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.message)
    if isinstance(request, Iterator):
        return _decoded_items(request)
    return request


def _decoded_items(items: Iterator[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, _Undecodable):
            raise InvalidArgument(item.message)
        yield item


# A client-stream item after deserialization: a chunk decoded straight from the received
# bytes as ``(tensor, offset, data view)``, or the parsed protobuf message (headers).
ChunkView = tuple[int, int, memoryview]


def _first_item(requests: Iterator[Any], expected: str, what: str) -> Any:
    """The first message of a client stream, which must carry ``expected`` (the header)."""
    first = next(requests, None)
    if first is None:
        raise InvalidArgument(f"empty stream: the first message must be a {what}")
    kind = "chunk" if isinstance(first, tuple) else first.WhichOneof("item")
    if kind != expected:
        raise InvalidArgument(f"the first message of the stream must be a {what}, got {kind}")
    return getattr(first, expected)


def _chunk_or(message_cls: Any) -> Callable[[bytes], Any]:
    """Request deserializer: chunk items as views of the received bytes (one copy fewer)."""

    def deserialize(raw: bytes) -> ChunkView | Any:
        chunk = wire.decode_chunk_item(raw)
        return chunk if chunk is not None else message_cls.FromString(raw)

    return deserialize


def _message_or_bytes(item: Any) -> bytes:
    """Response serializer: pre-encoded chunk items pass through, messages are serialized."""
    return item if isinstance(item, bytes) else item.SerializeToString()


# Tensor streams bypass protobuf for their chunks, both ways (see paramserve.wire.framing).
_RAW_CHUNKS_IN = ("CreateModel", "Push", "SetOptimizerState")
_RAW_CHUNKS_OUT = ("Pull",)


def add_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Register ``servicer`` like the generated ``add_..._to_server``, with raw chunk codecs."""
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        raw_in, raw_out = method.name in _RAW_CHUNKS_IN, method.name in _RAW_CHUNKS_OUT
        handlers[method.name] = kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=_tolerant(
                _chunk_or(request_cls) if raw_in else request_cls.FromString, request_cls
            ),
            response_serializer=_message_or_bytes if raw_out else response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _aggregation_info(config: AggregationConfig) -> pb.AggregationInfo:
    """The aggregator's settings on the wire (the proto fields mirror the dataclass)."""
    return pb.AggregationInfo(**dataclasses.asdict(config))


def _snapshot_pb(info: SnapshotInfo) -> pb.SnapshotInfo:
    return pb.SnapshotInfo(
        id=info.id, version=info.version, size_bytes=info.size_bytes, created_at=info.created_at
    )


def _dense_header(name: str, dtype: str, shape: tuple[int, ...]) -> tpb.TensorHeader:
    code = wire.dtype_to_proto(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return tpb.TensorHeader(name=name, dtype=code, shape=list(shape), byte_length=size)


def _weights_selection(
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


def _require_end(ended: bool, method: str, context: grpc.ServicerContext) -> None:
    """Refuse a client stream that did not end with its end item, or whose call has ended.

    gRPC Python ends the request iterator normally when the transport refuses a message
    (one over ``max_message_bytes``) or the client goes away; the end item and the call
    still being active together prove the client sent everything, so only then does a
    request change state.
    """
    if not ended:
        raise InvalidArgument(
            f"{method}: the stream ended without its end item (StreamEnd), so the request "
            "may be incomplete; nothing was changed. Send the header, the chunks, then `end`"
        )
    if not context.is_active():
        raise Cancelled(f"{method}: the call ended before the request was acted on")


def _drain(items: collections.deque[bytes]) -> Iterator[bytes]:
    """Yield and forget ``items`` one by one, so each can be freed once it is sent."""
    while items:
        yield items.popleft()


def _unknown_scope(scope: int) -> str:
    return (
        f"unknown pull scope {scope}; expected PULL_SCOPE_WEIGHTS (0) or "
        "PULL_SCOPE_OPTIMIZER_STATE (1)"
    )


def _push_response(result: Any) -> pb.PushResponse:
    return pb.PushResponse(
        duplicate=result.duplicate,
        version=result.version,
        contributors=result.contributors,
        applied=result.applied,
    )


def _outcome(exc: BaseException) -> str:
    """The push-outcome label of a failed push: its status code in lower case."""
    return status_code(exc).name.lower()


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """Thin adapter from the ``paramserve.v1.ParameterServer`` service to a :class:`ServerCore`."""

    def __init__(self, core: ServerCore) -> None:
        self._core = core
        self._store = core.store
        self._aggregator = core.aggregator
        self._limits = core.config.limits
        self._metrics = core.metrics
        self._chunk_bytes = max(
            1, min(OUT_CHUNK_BYTES, self._limits.max_message_bytes - _FRAMING_HEADROOM_BYTES)
        )
        self._optimizer_specs_cache: tuple[Any, dict[str, tuple[str, tuple[int, ...]]]] = (None, {})
        self._variable_specs_cache: tuple[
            int, dict[str, tuple[str, tuple[int, ...]]], dict[str, tpb.TensorHeader]
        ] = (-1, {}, {})
        # Step's own counters, bound once (labels() costs microseconds per call).
        self._step_received_bytes = self._metrics.bytes_received.labels(method="Step")
        self._step_sent_bytes = self._metrics.bytes_sent.labels(method="Step")
        self._step_pulled = self._metrics.pulls.labels(outcome="ok")

    # -- helpers -----------------------------------------------------------------------------

    def _require_accepting(self) -> None:
        if not self._core.accepting.is_set():
            raise Unavailable("the server is shutting down; retry against another instance")

    def _require_model(self) -> None:
        if not self._store.has_model:
            raise NotFound(
                "no model on this server: create one with CreateModel first", reason="NO_MODEL"
            )

    def _check_sizes(self, headers: list[tpb.TensorHeader], *, dense_only: bool) -> None:
        """Headers well formed, every tensor and the request within the configured limits."""
        if len(headers) > self._limits.max_variables:
            raise limit_exceeded(
                f"{len(headers)} tensors in one request, over the server's limit of "
                f"max_variables={self._limits.max_variables}",
                limit="max_variables",
                limit_value=self._limits.max_variables,
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
            if h.byte_length > self._limits.max_tensor_bytes:
                raise limit_exceeded(
                    f"tensor {h.name!r} is {h.byte_length} bytes, over the server's limit of "
                    f"max_tensor_bytes={self._limits.max_tensor_bytes}",
                    limit="max_tensor_bytes",
                    limit_value=self._limits.max_tensor_bytes,
                    requested=h.byte_length,
                    variable=h.name,
                )
            total += h.byte_length
        if total > self._limits.max_request_bytes:
            raise limit_exceeded(
                f"request carries {total} payload bytes, over the server's limit of "
                f"max_request_bytes={self._limits.max_request_bytes}",
                limit="max_request_bytes",
                limit_value=self._limits.max_request_bytes,
                requested=total,
            )

    @staticmethod
    def _check_against(
        headers: list[tpb.TensorHeader],
        expected: dict[str, tuple[str, tuple[int, ...]]],
        *,
        what: str,
        unknown: type[ParamServeError],
    ) -> None:
        """Every header names a known tensor with its dtype and shape (before allocating)."""
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
            if got_dtype != dtype:
                raise InvalidArgument(
                    f"{what} {h.name!r}: dtype {got_dtype} does not match the expected {dtype}",
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

    def _assemble(
        self,
        headers: list[tpb.TensorHeader],
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        *,
        method: str,
        scan_finite: bool = False,
    ) -> dict[str, wire.TensorValue]:
        """Receive the chunks that follow a validated header, in strict order, then the end.

        ``scan_finite``: check dense gradients for NaN/Inf chunk by chunk as they arrive
        (overlapping the transfer), and return them as ``FiniteChecked`` so the store's
        check does not read them again.
        """
        assembler = wire.TensorAssembler(headers)
        scan = FiniteScan(headers) if scan_finite else None
        received = 0
        ended = False
        for item in requests:
            if ended:
                raise InvalidArgument(f"{method}: nothing may follow the end item")
            if isinstance(item, tuple):
                tensor, offset, data = item
            elif item.WhichOneof("item") == "chunk":
                tensor, offset, data = item.chunk.tensor, item.chunk.offset, item.chunk.data
            elif item.WhichOneof("item") == "end":
                ended = True
                continue
            else:
                raise InvalidArgument(
                    f"{method}: only chunks and the end item may follow the header"
                )
            assembler.add(tensor, offset, data)  # the one copy, into the tensor's buffer
            if scan is not None:
                scan.update(tensor, assembler.buffer(tensor), offset + len(data))
            received += len(data)
        self._metrics.bytes_received.labels(method=method).inc(received)
        tensors = assembler.finish()
        _require_end(ended, method, context)
        return FiniteChecked(tensors, finite=scan.finite()) if scan is not None else tensors

    def _variable_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Names, dtype names and shapes of the variables, cached per model generation."""
        return self._variable_cache()[1]

    def _variable_cache(
        self,
    ) -> tuple[int, dict[str, tuple[str, tuple[int, ...]]], dict[str, tpb.TensorHeader]]:
        """``(generation, specs, dense headers)`` of the variables, rebuilt per generation."""
        with self._store.lock:
            self._require_model()
            generation = self._store.generation
            if self._variable_specs_cache[0] != generation:
                specs = {s.name: (s.dtype, tuple(s.shape)) for s in self._store.specs()}
                headers = {n: _dense_header(n, d, shape) for n, (d, shape) in specs.items()}
                self._variable_specs_cache = (generation, specs, headers)
            return self._variable_specs_cache

    def _optimizer_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Names, dtypes and shapes of the optimizer state, cached per model definition."""
        with self._store.lock:
            self._require_model()
            key = (
                self._store.model_name,
                tuple(self._store.specs()),
                json.dumps(
                    self._store.optimizer_config(), sort_keys=True, default=wire.json_default
                ),
            )
            if self._optimizer_specs_cache[0] != key:
                _, items = self._store.optimizer_state()
                specs = {k: (np.asarray(v).dtype.name, tuple(np.shape(v))) for k, v in items}
                self._optimizer_specs_cache = (key, specs)
            return self._optimizer_specs_cache[1]

    def _parse_optimizer(self, text: str) -> dict | str:
        """The optimizer from JSON (a serialization dict or a name); never eval or pickle."""
        text = text.strip() or self._core.config.optimizer.strip()
        if _NAME_RE.match(text):
            return text
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
            raise InvalidArgument(f"optimizer_json is not valid JSON: {exc}") from None
        if not isinstance(value, dict | str):
            raise InvalidArgument(
                "optimizer_json must encode a Keras serialization dict "
                f'({{"class_name": ..., "config": {{...}}}}) or a name, got {type(value).__name__}'
            )
        return value

    def _read_weights(
        self,
        names: list[str] | None,
        rows: dict[str, np.ndarray] | None,
        encode: Callable[[list[wire.TensorValue]], T],
    ) -> tuple[int, list[tpb.TensorHeader], T]:
        """Headers of the weights at one version, and ``encode`` of them.

        ``encode`` runs under the store's lock on the live arrays and must copy what it
        keeps (it serializes them): one copy of each tensor, straight into the messages.
        """

        def headers_and(tensors: dict[str, wire.TensorValue]) -> tuple[list, T]:
            headers = [
                wire.sparse_header(n, v, specs[n][1])
                if isinstance(v, wire.SparseRows)
                else dense[n]
                for n, v in tensors.items()
            ]
            return headers, encode(list(tensors.values()))

        with self._store.lock:
            _, specs, dense = self._variable_cache()
            version, (headers, encoded) = self._store.read_with(headers_and, names, rows)
        return version, headers, encoded

    def _check_step_reply(
        self, names: list[str] | None, rows: dict[str, np.ndarray] | None
    ) -> None:
        """The weights a Step returns exist and fit one message (checked before the push)."""
        sizes = self._store.read_sizes(names, rows)
        total = wire.step_reply_bytes((n, size, rank) for n, (size, rank) in sizes.items())
        limit = self._limits.max_message_bytes
        if total > limit:
            raise limit_exceeded(
                f"the Step reply would carry about {total} bytes, over the server's limit of "
                f"max_message_bytes={limit}; use Push and Pull (streamed) for this model",
                limit="max_message_bytes",
                limit_value=limit,
                requested=total,
            )

    def _step_push(
        self,
        request: pb.StepRequest,
        selection: tuple[list[str] | None, dict[str, np.ndarray] | None],
        context: grpc.ServicerContext,
    ):
        """Everything Push does, for a Step's inline gradients; returns the aggregator's result.

        Validation (the reply's selection and size, headers, limits, names, dtypes, shapes,
        byte lengths) runs before the aggregator sees the push, so a bad Step changes nothing.
        """
        push = request.push
        if request.pull.scope != pb.PULL_SCOPE_WEIGHTS:
            raise InvalidArgument(
                f"a Step returns weights only (pull.scope {request.pull.scope} is not "
                "PULL_SCOPE_WEIGHTS); pull the optimizer state with Pull"
            )
        self._check_step_reply(*selection)
        headers = list(push.tensors)
        if len(request.gradients) != len(headers):
            raise InvalidArgument(
                f"the Step carries {len(request.gradients)} gradients, but push.tensors "
                f"describes {len(headers)}; describe each gradient there, in order"
            )
        self._check_sizes(headers, dense_only=False)
        self._check_against(headers, self._variable_specs(), what="variable", unknown=NotFound)
        grads: dict[str, wire.TensorValue] = {}
        for i, (header, gradient) in enumerate(zip(headers, request.gradients, strict=True)):
            if gradient.HasField("header") and gradient.header != header:
                raise InvalidArgument(
                    f"gradient #{i}: its inline header ({gradient.header.name!r}) differs from "
                    f"push.tensors[{i}] ({header.name!r}); leave it unset or make them equal"
                )
            grads[header.name] = wire.decode_whole(header, gradient.data)
        self._step_received_bytes.inc(sum(h.byte_length for h in headers))
        return self._aggregate(push, grads, context)

    def _aggregate(self, header: pb.PushHeader, grads: dict[str, wire.TensorValue], context):
        """Hand a validated push to the aggregator (exactly once, sync rounds), with metrics."""
        self._metrics.staleness.observe(max(0, self._store.version - header.base_version))
        start = time.perf_counter()
        try:
            result = self._aggregator.push(
                header.worker_id,
                header.sequence,
                header.base_version,
                grads,
                session=header.session,
                timeout_s=_remaining_s(context),
            )
        finally:  # aborted and timed-out waits count too
            self._metrics.round_wait_seconds.observe(time.perf_counter() - start)
        self._metrics.record_push(
            duplicate=result.duplicate, applied=result.applied, version=result.version
        )
        return result

    # -- model -------------------------------------------------------------------------------

    @_rpc("CreateModel")
    def CreateModel(self, request_iterator, context):  # noqa: N802
        self._require_accepting()
        header = _first_item(request_iterator, "header", "CreateModelHeader")
        headers = list(header.variables)
        self._check_sizes(headers, dense_only=True)
        optimizer = self._parse_optimizer(header.optimizer_json)
        variables = self._assemble(headers, request_iterator, context, method="CreateModel")
        outcome = self._store.create_model(header.model_name or "model", optimizer, variables)
        version = self._store.version
        self._metrics.model_version.set(version)
        logger.info(
            "model %r %s",
            header.model_name,
            "created" if outcome.created else "already existed",
        )
        return pb.CreateModelResponse(
            created=outcome.created, version=version, values_match=outcome.values_match
        )

    @_rpc("DeleteModel")
    def DeleteModel(self, request, context):  # noqa: N802
        self._require_accepting()
        self._store.delete_model()
        logger.info("model deleted")
        return pb.DeleteModelResponse()

    @_rpc("Describe")
    def Describe(self, request, context):  # noqa: N802
        with self._store.lock:
            self._require_model()
            variables = [_dense_header(s.name, s.dtype, s.shape) for s in self._store.specs()]
            config = self._store.optimizer_config()
            response = pb.DescribeResponse(
                model_name=self._store.model_name,
                variables=variables,
                optimizer_json=json.dumps(config, default=wire.json_default),
                hyperparameters=self._store.hyperparameters(),
                version=self._store.version,
                aggregation=_aggregation_info(self._aggregator.config),
            )
            optimizer_specs = self._optimizer_specs()
        response.optimizer_variables.extend(
            _dense_header(name, dtype, shape) for name, (dtype, shape) in optimizer_specs.items()
        )
        return response

    @_rpc("SetHyperparameters")
    def SetHyperparameters(self, request, context):  # noqa: N802
        self._require_accepting()
        self._require_model()
        values = self._store.set_hyperparameters(dict(request.values))
        config = self._store.optimizer_config()
        return pb.SetHyperparametersResponse(
            hyperparameters=values, optimizer_json=json.dumps(config, default=wire.json_default)
        )

    # -- training ----------------------------------------------------------------------------

    @_rpc("Push")
    def Push(self, request_iterator, context):  # noqa: N802
        self._require_accepting()
        header = _first_item(request_iterator, "header", "PushHeader")
        headers = list(header.tensors)
        self._check_sizes(headers, dense_only=False)
        self._check_against(headers, self._variable_specs(), what="variable", unknown=NotFound)
        grads = self._assemble(
            headers,
            request_iterator,
            context,
            method="Push",
            scan_finite=self._store.nonfinite != "allow",
        )
        return _push_response(self._aggregate(header, grads, context))

    @_rpc("Pull")
    def Pull(self, request, context):  # noqa: N802
        if request.min_version > 0:
            self._store.wait_for_version(request.min_version, _remaining_s(context))
        if request.scope == pb.PULL_SCOPE_OPTIMIZER_STATE:
            if request.names or request.rows:
                raise InvalidArgument("optimizer-state pulls take no names or rows")
            self._require_model()
            version, items = self._store.optimizer_state()
            names = [name for name, _ in items]
            values: list[wire.TensorValue] = [value for _, value in items]
            headers = [wire.header_for(n, v) for n, v in zip(names, values, strict=True)]
            chunks: Iterator[bytes] = wire.encoded_chunk_items(
                values, chunk_bytes=self._chunk_bytes
            )
        elif request.scope == pb.PULL_SCOPE_WEIGHTS:
            # Encoded from the live weights under the lock, then sent outside it; each chunk
            # is let go once gRPC has taken it.
            version, headers, encoded = self._read_weights(
                *_weights_selection(request),
                lambda values: collections.deque(
                    wire.encoded_chunk_items(values, chunk_bytes=self._chunk_bytes)
                ),
            )
            chunks = _drain(encoded)
        else:
            raise InvalidArgument(_unknown_scope(request.scope))
        yield tpb.TensorStreamItem(header=tpb.TensorStreamHeader(tensors=headers, version=version))
        # Pre-encoded TensorStreamItem chunks (see add_to_server).
        yield from chunks
        self._metrics.bytes_sent.labels(method="Pull").inc(sum(h.byte_length for h in headers))

    @_rpc("Step")
    def Step(self, request, context):  # noqa: N802
        try:
            self._require_accepting()
            selection = _weights_selection(request.pull)
            result = self._step_push(request, selection, context)
        except Exception as exc:
            self._metrics.pushes.labels(outcome=_outcome(exc)).inc()
            raise
        version, headers, payloads = self._read_weights(
            *selection, lambda values: [wire.whole_payload(v) for v in values]
        )
        weights = [
            pb.InlineTensor(header=h, data=data) for h, data in zip(headers, payloads, strict=True)
        ]
        self._step_pulled.inc()
        self._step_sent_bytes.inc(sum(h.byte_length for h in headers))
        return pb.StepResponse(push=_push_response(result), version=version, weights=weights)

    @_rpc("SetOptimizerState")
    def SetOptimizerState(self, request_iterator, context):  # noqa: N802
        self._require_accepting()
        header = _first_item(request_iterator, "header", "TensorStreamHeader")
        headers = list(header.tensors)
        self._check_sizes(headers, dense_only=True)
        self._check_against(
            headers, self._optimizer_specs(), what="optimizer variable", unknown=InvalidArgument
        )
        arrays = self._assemble(headers, request_iterator, context, method="SetOptimizerState")
        version = self._store.set_optimizer_state(arrays)
        self._metrics.model_version.set(version)
        return pb.SetOptimizerStateResponse(version=version)

    @_rpc("GetStatus")
    def GetStatus(self, request, context):  # noqa: N802
        status = self._aggregator.status()
        workers = [
            pb.WorkerStatus(
                worker_id=w.worker_id,
                last_sequence=w.last_sequence,
                pushes=w.pushes,
                seconds_since_seen=w.seconds_since_seen,
                pending=w.pending,
            )
            for w in status.workers
        ]
        return pb.GetStatusResponse(
            server_version=server_version(),
            has_model=self._store.has_model,
            version=self._store.version,
            rounds_completed=status.rounds_completed,
            rounds_aborted=status.rounds_aborted,
            rounds_partial=status.rounds_partial,
            workers=workers,
            pending_pushes=status.pending_pushes,
            aggregation=_aggregation_info(self._aggregator.config),
            device=self._store.device,
            uptime_s=time.monotonic() - self._core.started_at,
            serving=self._core.accepting.is_set(),
        )

    # -- snapshots ---------------------------------------------------------------------------

    @_rpc("CreateSnapshot")
    def CreateSnapshot(self, request, context):  # noqa: N802
        self._require_accepting()
        return _snapshot_pb(self._core.take_snapshot(trigger="rpc"))

    @_rpc("ListSnapshots")
    def ListSnapshots(self, request, context):  # noqa: N802
        infos = self._core.require_snapshots().list()
        return pb.ListSnapshotsResponse(snapshots=[_snapshot_pb(i) for i in infos])

    @_rpc("RestoreSnapshot")
    def RestoreSnapshot(self, request, context):  # noqa: N802
        self._require_accepting()
        info = self._core.restore_snapshot(request.id)
        return pb.RestoreSnapshotResponse(snapshot=_snapshot_pb(info))

    @_rpc("DownloadSnapshot")
    def DownloadSnapshot(self, request, context):  # noqa: N802
        path = self._core.require_snapshots().path(request.id)
        sent = 0
        with path.open("rb") as fh:
            total = os.fstat(fh.fileno()).st_size
            while True:
                data = fh.read(self._chunk_bytes)
                if not data and sent > 0:
                    break
                yield pb.FileChunk(offset=sent, data=data, total_size=total)
                sent += len(data)
                if not data:  # an empty file still gets one chunk carrying total_size
                    break
        self._metrics.bytes_sent.labels(method="DownloadSnapshot").inc(sent)

    @_rpc("UploadSnapshot")
    def UploadSnapshot(self, request_iterator, context):  # noqa: N802
        self._require_accepting()
        self._core.require_snapshots()
        header = _first_item(request_iterator, "header", "UploadSnapshotHeader")
        size = header.size_bytes
        if size > self._limits.max_state_bytes:
            raise limit_exceeded(
                f"snapshot of {size} bytes is over the server's limit of "
                f"max_state_bytes={self._limits.max_state_bytes}",
                limit="max_state_bytes",
                limit_value=self._limits.max_state_bytes,
                requested=size,
            )
        received = 0

        def chunks() -> Iterator[bytes]:
            nonlocal received
            ended = False
            for item in request_iterator:
                if ended:
                    raise InvalidArgument("UploadSnapshot: nothing may follow the end item")
                if item.WhichOneof("item") == "end":
                    ended = True
                    continue
                if item.WhichOneof("item") != "chunk":
                    raise InvalidArgument(
                        "UploadSnapshot: only chunks and the end item may follow the header"
                    )
                if item.chunk.offset != received:
                    raise InvalidArgument(
                        f"snapshot chunk at offset {item.chunk.offset}, expected {received}"
                    )
                data = item.chunk.data
                received += len(data)
                if received > size:
                    raise InvalidArgument(f"more than the declared {size} bytes were sent")
                yield data
            if received != size:
                raise InvalidArgument(f"upload ended early: {received} of {size} bytes")
            _require_end(ended, "UploadSnapshot", context)

        info, restored = self._core.upload_snapshot(
            chunks(), size_bytes=size, restore=header.restore
        )
        self._metrics.bytes_received.labels(method="UploadSnapshot").inc(received)
        logger.info("snapshot %s uploaded (%d bytes)", info.id, info.size_bytes)
        return pb.UploadSnapshotResponse(snapshot=_snapshot_pb(info), restored=restored)
