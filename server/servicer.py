"""The ParameterServer gRPC servicer: messages in, one core operation, messages out.

Each handler decodes its request (:mod:`.streams`, :mod:`.messages`), calls one or two
operations of the :class:`~paramserve.server.core.ServerCore`, and encodes the reply; it
holds no model state (only cached reply headers) and takes no lock. Every failure, whatever
raised it, ends the call with the status :mod:`.status` gives it, and is counted by that
status's code (:func:`_rpc`). Tensor streams bypass protobuf for their chunks both ways
(see :func:`add_to_server`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory

from paramserve import wire
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb
from paramserve.wire.partition import SHARD_METADATA_KEY

from . import messages, streams
from .aggregation import PushResult
from .core import ReshardRequest, ServerCore, Specs
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .metrics import ServerMetrics
from .status import grpc_status, status_of

logger = logging.getLogger(__name__)

# Payload per outgoing message: a whole chunk, as clients send (a 4 MiB tensor is two messages,
# not two and a 32 KiB tail); its few bytes of framing keep it far below gRPC's default 4 MiB
# receive limit. A server whose max_message_bytes is smaller sends less, leaving this headroom.
_FRAMING_HEADROOM_BYTES = 16 << 10
OUT_CHUNK_BYTES = wire.CHUNK_BYTES
# Besides paramserve_rpcs_total, a Push that fails counts as a push of that outcome and every
# Pull as a pull, whoever answered the call (its handler or the auth interceptor).
COUNTS_AS = {"Push": "push", "Pull": "pull"}
# Tensor streams bypass protobuf for their chunks, both ways (see paramserve.wire.framing).
_RAW_CHUNKS_IN = ("CreateModel", "Push", "SetOptimizerState")
_RAW_CHUNKS_OUT = ("Pull",)
# Step header lists remembered as checked (a few per worker; cleared when full).
# Answered whatever the caller's view of the job (operators' tools ask any shard).
_ANY_VIEW = frozenset({"GetStatus"})
# Read-only calls a plain client (no view of a sharded job at all) may make of one shard:
# what `paramserve top` and `paramserve snapshots --address SHARD` show of it.
_OBSERVER_CALLS = frozenset({"Describe", "ListSnapshots"})
_CHECKED_HEADERS_MAX = 256
# Push header lists remembered as checked, with their stream layouts (cleared when full).
_PUSH_PLANS_MAX = 64
# Most stripes one pull may be cut into (PullRequest.stripes).
MAX_STRIPES = 64


@dataclasses.dataclass(frozen=True)
class _PushPlan:
    """A push's header list checked against one model's specs (``specs`` is that model's
    object), with its stream layout and NaN-scan segments: workers send the same headers
    every step, so a push whose headers match one needs none of it again."""

    specs: Specs
    headers: list[tpb.TensorHeader]
    layout: wire.StreamLayout
    segments: list[streams.ScanSegment]


def _push_plan_key(header: pb.PushHeader) -> bytes:
    """The serialized header less its per-push fields: equal for pushes whose tensors and
    wire dtype are (one copy and one serialization, in C, however many tensors)."""
    key = pb.PushHeader()
    key.CopyFrom(header)
    for field in ("worker_id", "sequence", "base_version", "session", "prepare"):
        key.ClearField(field)
    return key.SerializeToString()


def _remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else remaining


def _rpc(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a handler (plain or generator): a failure ends the call with its status, and
    every call is counted by method and code."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        def fail(
            self: ParameterServerServicer,
            context: grpc.ServicerContext,
            exc: Exception,
            started: float,
        ):
            seconds = time.perf_counter() - started
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                self.count_call(method, "CANCELLED", seconds)  # the client went away
                raise exc
            status = grpc_status(exc, method)
            self.count_call(method, status.code.name, seconds)
            context.abort_with_status(status)

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream_handler(self, request, context):
                started = time.perf_counter()
                try:
                    if method not in _ANY_VIEW:
                        self.check_shard_view(context, observer=method in _OBSERVER_CALLS)
                    yield from fn(self, streams.decoded(request), context)
                except Exception as exc:
                    fail(self, context, exc, started)
                else:
                    self.count_call(method, "OK", time.perf_counter() - started)

            return stream_handler

        @functools.wraps(fn)
        def handler(self, request, context):
            started = time.perf_counter()
            try:
                if method not in _ANY_VIEW:
                    self.check_shard_view(context, observer=method in _OBSERVER_CALLS)
                response = fn(self, streams.decoded(request), context)
            except Exception as exc:
                fail(self, context, exc, started)
            self.count_call(method, "OK", time.perf_counter() - started)
            return response

        return handler

    return decorate


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
        deserialize = streams.chunk_or(request_cls) if raw_in else request_cls.FromString
        handlers[method.name] = kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=streams.tolerant(deserialize, request_cls),
            response_serializer=(
                streams.message_or_bytes if raw_out else response_cls.SerializeToString
            ),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """Thin adapter from the ``paramserve.v1.ParameterServer`` service to a :class:`ServerCore`."""

    def __init__(self, core: ServerCore, metrics: ServerMetrics) -> None:
        self._core = core
        self._limits = core.config.limits
        self._metrics = metrics
        self._chunk_bytes = max(
            1, min(OUT_CHUNK_BYTES, self._limits.max_message_bytes - _FRAMING_HEADROOM_BYTES)
        )
        self._weight_headers = messages.WeightHeaders()
        self._wire_weights = messages.WireWeights()
        # Counters bound once (labels() costs microseconds per call).
        self._received = {
            m: metrics.bytes_received.labels(method=m)
            for m in (*_RAW_CHUNKS_IN, "Step", "UploadSnapshot")
        }
        self._step_sent_bytes = metrics.bytes_sent.labels(method="Step")
        self._step_pulled = metrics.pulls.labels(outcome="ok")
        # Step header lists (their serialized headers) that passed the size and spec checks,
        # with the specs object they passed against.
        self._checked_step_headers: dict[tuple[int | bytes, ...], Specs] = {}
        self._push_plans: dict[bytes, _PushPlan] = {}
        # The serialized TensorStreamHeader (tensors only) of the last header list a pull
        # replied with, for the next pull of the same list (WeightHeaders hands it out again).
        self._reply_headers: tuple[list[tpb.TensorHeader], bytes, int] | None = None
        self._shard = (core.config.shard_index, core.config.shards)
        self._shard_view = f"{self._shard[0]}/{self._shard[1]}"

    def check_shard_view(self, context: grpc.ServicerContext, *, observer: bool = False) -> None:
        """FailedPrecondition (SHARD_MISMATCH) unless the caller sees this daemon's place in
        its job as the daemon does: a sharded client sends ``INDEX/SHARDS`` with every call,
        and a plain client (no such metadata) may talk only to a job of one shard, or, with
        ``observer``, make a read-only call of one shard."""
        index, shards = self._shard
        view = None
        for key, value in context.invocation_metadata() or ():
            if key == SHARD_METADATA_KEY:
                view = value
                break
        if view is None:
            if shards == 1 or observer:
                return
            raise FailedPrecondition(
                f"this daemon is shard {index} of a job of {shards} shards: connect with "
                "Client([every shard's address, in shard order]), not to one shard alone",
                reason="SHARD_MISMATCH",
                metadata={"shard_index": index, "shards": shards},
            )
        if view == self._shard_view:
            return
        raise FailedPrecondition(
            f"the client sees this server as shard {view.replace('/', ' of ')}, but it is shard "
            f"{index} of {shards}: list every shard's address in shard order (shard i at "
            "position i), the same number as the job's --shards",
            reason="SHARD_MISMATCH",
            metadata={"shard_index": index, "shards": shards, "client_view": view},
        )

    def count_call(self, method: str, code: str, seconds: float | None = None) -> None:
        """Count a finished call by method and status code name (also the auth interceptor's
        refusals), and as a push or pull outcome where :data:`COUNTS_AS` says so; observe
        the handler's time ``seconds`` when given."""
        self._metrics.record_rpc(method, code, counts_as=COUNTS_AS.get(method), seconds=seconds)

    # -- helpers -----------------------------------------------------------------------------

    def _receive(
        self,
        method: str,
        headers: list[tpb.TensorHeader],
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        *,
        scan_finite: bool = False,
    ) -> dict[str, wire.TensorValue]:
        """The tensors of a client stream whose ``headers`` were checked."""
        return streams.receive_tensors(
            headers,
            requests,
            context,
            method=method,
            count_bytes=self._received[method].inc,
            scan_finite=scan_finite,
        )

    def _push_plan(self, header: pb.PushHeader) -> _PushPlan:
        """The checked headers of a push, from the cache when the same list passed against
        this model before; checked in bulk (sizes, limits, names, dtypes, shapes) otherwise."""
        key = _push_plan_key(header)
        specs = self._core.variable_specs()
        plan = self._push_plans.get(key)
        if plan is not None and plan.specs is specs:
            return plan
        headers = list(header.tensors)
        messages.check_sizes(headers, self._limits, dense_only=False)
        messages.check_against(
            headers, specs, what="variable", unknown=NotFound, wire_dtype=header.wire_dtype
        )
        widen = None
        if header.wire_dtype:
            wire.prepare_casts()  # compiled or loaded once, before anything is received
            widen = messages.widened_on_arrival(headers, specs)
        layout = wire.StreamLayout(headers, widen=widen if widen and any(widen) else None)
        plan = _PushPlan(specs, headers, layout, streams.scan_segments(layout))
        if len(self._push_plans) >= _PUSH_PLANS_MAX:
            self._push_plans.clear()
        self._push_plans[key] = plan
        return plan

    def _stream_header_body(
        self, headers: list[tpb.TensorHeader], version: int
    ) -> tuple[bytes, int]:
        """The serialized ``TensorStreamHeader`` of a reply, and its payload bytes: the
        tensors' part is kept from the last reply with the same header list, the version
        appended by hand."""
        cached = self._reply_headers
        if cached is None or cached[0] is not headers:
            body = tpb.TensorStreamHeader(tensors=headers).SerializeToString()
            self._reply_headers = cached = (headers, body, sum(h.byte_length for h in headers))
        return wire.stream_header_body(cached[1], version), cached[2]

    def _stream_header(self, headers: list[tpb.TensorHeader], version: int) -> tuple[bytes, int]:
        """The serialized ``TensorStreamItem(header=...)`` of a reply (see
        :meth:`_stream_header_body`), and its payload bytes."""
        body, payload = self._stream_header_body(headers, version)
        return wire.length_delimited(1, body), payload

    def _push(
        self, header: pb.PushHeader, grads: dict[str, wire.TensorValue], context
    ) -> PushResult:
        """Hand a checked push to the core (exactly once; sync rounds wait for their round)."""
        return self._core.push(
            header.worker_id,
            header.sequence,
            header.base_version,
            grads,
            session=header.session,
            timeout_s=_remaining_s(context),
        )

    def _step_gradients(self, request: pb.StepRequest) -> dict[str, wire.TensorValue]:
        """A Step's inline gradients, each checked against its header and the model."""
        headers = list(request.push.tensors)
        if len(request.gradients) != len(headers):
            raise InvalidArgument(
                f"the Step carries {len(request.gradients)} gradients, but push.tensors "
                f"describes {len(headers)}; describe each gradient there, in order"
            )
        # A worker sends the same headers every step: ones that passed against this model's
        # specs (one object per model) pass again, so only their bytes are compared.
        wire_dtype = request.push.wire_dtype
        key = (wire_dtype, *(h.SerializeToString() for h in headers))
        specs = self._core.variable_specs()
        checked = self._checked_step_headers.get(key)
        if checked is None or checked is not specs:
            messages.check_sizes(headers, self._limits, dense_only=False)
            messages.check_against(
                headers, specs, what="variable", unknown=NotFound, wire_dtype=wire_dtype
            )
            if len(self._checked_step_headers) >= _CHECKED_HEADERS_MAX:
                self._checked_step_headers.clear()
            self._checked_step_headers[key] = specs
        grads: dict[str, wire.TensorValue] = {}
        for i, (header, gradient) in enumerate(zip(headers, request.gradients, strict=True)):
            if gradient.HasField("header") and gradient.header != header:
                raise InvalidArgument(
                    f"gradient #{i}: its inline header ({gradient.header.name!r}) differs from "
                    f"push.tensors[{i}] ({header.name!r}); leave it unset or make them equal"
                )
            grads[header.name] = wire.decode_whole(header, gradient.data)
        self._received["Step"].inc(sum(h.byte_length for h in headers))
        if wire_dtype:
            messages.upcast_compressed(grads, specs)
        return grads

    @staticmethod
    def _stripe_of(request: pb.PullRequest) -> tuple[int, int] | None:
        """``(stripe, stripes)`` of a striped weights pull (None: the whole stream)."""
        if not request.stripes and not request.stripe:
            return None
        if not 2 <= request.stripes <= MAX_STRIPES or request.stripe >= request.stripes:
            raise InvalidArgument(
                f"stripe {request.stripe} of {request.stripes}: a striped pull takes 2 to "
                f"{MAX_STRIPES} stripes, numbered from 0"
            )
        if not request.packed_chunks:
            raise InvalidArgument("a striped pull needs packed_chunks (stripes are whole chunks)")
        return request.stripe, request.stripes

    @staticmethod
    def _wire_dtype(request: pb.PullRequest) -> Any:
        """The NumPy dtype a weights pull opted in to (None: exact)."""
        name = messages.wire_dtype_name(request.wire_dtype, "wire_dtype")
        if name is None:
            return None
        wire.prepare_casts()  # compiled or loaded once, here rather than under the model lock
        return wire.dtype_from_name(name)

    def _encoded_weights(
        self, specs: Specs, tensors: dict[str, wire.TensorValue], dtype: Any
    ) -> tuple[dict[str, wire.TensorValue], list[tpb.TensorHeader]]:
        """``tensors``, their float32 ones rounded to the pull's wire ``dtype`` if any, and
        the reply's headers (the cached ones of exact weights, or of the whole model's
        rounded ones). Under the store's lock, as the rounded buffers are reused."""
        if dtype is None:
            return tensors, self._weight_headers(specs, tensors)
        return self._wire_weights(specs, tensors, dtype, self._core.store.weight_writes)

    @contextlib.contextmanager
    def _counted_as_push(self) -> Iterator[None]:
        """A failure inside counts as a push of that outcome (Step's push part)."""
        try:
            yield
        except Exception as exc:
            self._metrics.pushes.labels(outcome=status_of(exc).name.lower()).inc()
            raise

    # -- model -------------------------------------------------------------------------------

    @_rpc("CreateModel")
    def CreateModel(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> pb.CreateModelResponse:
        """Create the model from a header and its variables' chunks (idempotent)."""
        self._core.require_accepting()
        header = streams.first_item(request_iterator, "header", "CreateModelHeader")
        headers = list(header.variables)
        messages.check_sizes(headers, self._limits, dense_only=True)
        optimizer = self._core.parse_optimizer(header.optimizer_json)
        variables = self._receive("CreateModel", headers, request_iterator, context)
        outcome, version = self._core.create_model(
            header.model_name or "model", optimizer, variables
        )
        return pb.CreateModelResponse(
            created=outcome.created, version=version, values_match=outcome.values_match
        )

    @_rpc("DeleteModel")
    def DeleteModel(  # noqa: N802
        self, request: pb.DeleteModelRequest, context: grpc.ServicerContext
    ) -> pb.DeleteModelResponse:
        """Drop the model and its optimizer state."""
        self._core.require_accepting()
        self._core.delete_model()
        return pb.DeleteModelResponse()

    @_rpc("Describe")
    def Describe(  # noqa: N802
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        """The model's variables, optimizer and hyperparameters."""
        return messages.describe_response(self._core.describe())

    @_rpc("SetHyperparameters")
    def SetHyperparameters(  # noqa: N802
        self, request: pb.SetHyperparametersRequest, context: grpc.ServicerContext
    ) -> pb.SetHyperparametersResponse:
        """Change hyperparameters live."""
        self._core.require_accepting()
        values, config = self._core.set_hyperparameters(request.values)
        return pb.SetHyperparametersResponse(
            hyperparameters=values, optimizer_json=messages.optimizer_json(config)
        )

    # -- training ----------------------------------------------------------------------------

    @_rpc("Push")
    def Push(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> pb.PushResponse:
        """Apply a push of gradients streamed in chunks (exactly once)."""
        self._core.require_accepting()
        header = streams.first_item(request_iterator, "header", "PushHeader")
        plan = self._push_plan(header)
        grads = streams.receive_tensors(
            plan.headers,
            request_iterator,
            context,
            method="Push",
            count_bytes=self._received["Push"].inc,
            scan_finite=self._core.checks_finite,
            layout=plan.layout,
            segments=plan.segments,
            # Dense gradients of a compressed push arrive widened to float32 in the receive
            # buffer, so slabs can take them whole as well.
            packed=True,
        )
        if header.wire_dtype:
            # Sparse rows, widened after the finite scan, which holds for the upcast values
            # too (exact widening); dense ones arrived widened.
            messages.upcast_compressed(grads, plan.specs)
        if header.prepare:
            result = self._core.prepare(
                header.worker_id,
                header.sequence,
                header.base_version,
                grads,
                session=header.session,
            )
        else:
            result = self._push(header, grads, context)
        return messages.push_response(result, reads_merged_items=True)

    @_rpc("CommitRound")
    def CommitRound(  # noqa: N802
        self, request: pb.CommitRoundRequest, context: grpc.ServicerContext
    ) -> pb.CommitRoundResponse:
        """Commit a prepared push into the coordinator's round; answers when it closes."""
        self._core.require_accepting()
        result, decision = self._core.commit_round(
            request.worker_id,
            request.sequence,
            request.base_version,
            session=request.session,
            skipped=request.skipped,
            timeout_s=_remaining_s(context),
        )
        return pb.CommitRoundResponse(
            push=messages.push_response(result),
            decision=messages.round_decision_message(decision),
        )

    @_rpc("ApplyRound")
    def ApplyRound(  # noqa: N802
        self, request: pb.ApplyRoundRequest, context: grpc.ServicerContext
    ) -> pb.ApplyRoundResponse:
        """Apply the coordinator's decision of a round on this shard (idempotent)."""
        self._core.require_accepting()
        version, applied = self._core.apply_round(messages.round_decision(request.decision))
        return pb.ApplyRoundResponse(version=version, applied=applied)

    @_rpc("Pull")
    def Pull(  # noqa: N802
        self, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Stream weights (or the optimizer state) at one version."""
        if request.min_version > 0:
            self._core.wait_for_version(request.min_version, _remaining_s(context))
        if request.scope == pb.PULL_SCOPE_OPTIMIZER_STATE:
            if request.names or request.rows:
                raise InvalidArgument("optimizer-state pulls take no names or rows")
            if request.stripes or request.stripe:
                raise InvalidArgument("optimizer-state pulls are not striped")
            version, items = self._core.optimizer_state()
            values: list[wire.TensorValue] = [value for _, value in items]
            headers = [wire.header_for(name, value) for name, value in items]
            chunks = wire.encoded_chunk_items(
                values, chunk_bytes=self._chunk_bytes, packed=request.packed_chunks
            )
        elif request.scope == pb.PULL_SCOPE_WEIGHTS:
            encode_as = self._wire_dtype(request)
            striped = self._stripe_of(request)
            # Merged items and stripes: the header is built under the lock, at the version
            # read (it rides in the first chunk's message, or says which bytes follow).
            whole = not (request.merged_items and request.packed_chunks) and striped is None
            sent = [0]  # the payload bytes of a reply that is not whole

            # Encoded from the live weights under the lock, then sent outside it; each chunk
            # is let go once gRPC has taken it.
            def encode(specs: Specs, tensors: dict[str, wire.TensorValue]) -> tuple[list, Any]:
                tensors, headers = self._encoded_weights(specs, tensors, encode_as)
                values = list(tensors.values())
                runs = getattr(tensors, "runs", None)  # slabs' stretches, whole
                if whole:
                    items = wire.encoded_chunk_items(
                        values,
                        chunk_bytes=self._chunk_bytes,
                        packed=request.packed_chunks,
                        runs=runs,
                    )
                    return headers, collections.deque(items)
                version = self._core.model_version() or 0  # (under the lock: the one read)
                body, total = self._stream_header_body(headers, version)
                chunks = None
                if striped is not None:
                    first, stop, start, end = wire.stripe_range(
                        total, self._chunk_bytes, *striped
                    )
                    chunks, total = (first, stop), end - start
                    body += wire.length_delimited(
                        3, tpb.PayloadRange(start=start, end=end).SerializeToString()
                    )
                sent[0] = total
                if request.merged_items:
                    items = wire.merged_stream_items(
                        body, values, chunk_bytes=self._chunk_bytes, runs=runs, chunks=chunks
                    )
                else:
                    items = itertools.chain(
                        (wire.length_delimited(1, body),),
                        wire.encoded_chunk_items(
                            values, chunk_bytes=self._chunk_bytes, runs=runs, chunks=chunks
                        ),
                    )
                return headers, collections.deque(items)

            version, (headers, encoded) = self._core.read_weights(
                *messages.weights_selection(request), encode
            )
            chunks = streams.drain(encoded)
            if not whole:  # the header is in the first item (or is the first item)
                yield from chunks
                self._metrics.bytes_sent.labels(method="Pull").inc(sent[0])
                return
        else:
            raise InvalidArgument(messages.unknown_scope(request.scope))
        item, payload = self._stream_header(headers, version)
        yield item
        yield from chunks  # pre-encoded TensorStreamItem chunks (see add_to_server)
        self._metrics.bytes_sent.labels(method="Pull").inc(payload)

    @_rpc("Step")
    def Step(  # noqa: N802
        self, request: pb.StepRequest, context: grpc.ServicerContext
    ) -> pb.StepResponse:
        """Push inline gradients, then return the weights inline."""
        with self._counted_as_push():
            self._core.require_accepting()
            selection = messages.weights_selection(request.pull)
            if request.pull.scope != pb.PULL_SCOPE_WEIGHTS:
                raise InvalidArgument(
                    f"a Step returns weights only (pull.scope {request.pull.scope} is not "
                    "PULL_SCOPE_WEIGHTS); pull the optimizer state with Pull"
                )
            # Everything is checked before the push, so a bad Step changes nothing.
            encode_as = self._wire_dtype(request.pull)
            messages.check_step_reply(self._core.read_sizes(*selection), self._limits)
            result = self._push(request.push, self._step_gradients(request), context)

        def encode(specs: Specs, tensors: dict[str, wire.TensorValue]) -> tuple[list, list]:
            tensors, headers = self._encoded_weights(specs, tensors, encode_as)
            payloads = [wire.whole_payload(v) for v in tensors.values()]
            return headers, payloads

        version, (headers, payloads) = self._core.read_weights(*selection, encode)
        response = pb.StepResponse(push=messages.push_response(result), version=version)
        # Filled in place: InlineTensor messages handed to the constructor would each be
        # copied once more, payload included.
        for header, data in zip(headers, payloads, strict=True):
            tensor = response.weights.add()
            tensor.header.CopyFrom(header)
            tensor.data = data
        self._step_pulled.inc()
        self._step_sent_bytes.inc(sum(h.byte_length for h in headers))
        return response

    @_rpc("SetOptimizerState")
    def SetOptimizerState(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> pb.SetOptimizerStateResponse:
        """Replace every optimizer variable."""
        self._core.require_accepting()
        header = streams.first_item(request_iterator, "header", "TensorStreamHeader")
        headers = list(header.tensors)
        messages.check_sizes(headers, self._limits, dense_only=True)
        messages.check_against(
            headers,
            self._core.optimizer_specs(),
            what="optimizer variable",
            unknown=InvalidArgument,
        )
        arrays = self._receive("SetOptimizerState", headers, request_iterator, context)
        return pb.SetOptimizerStateResponse(version=self._core.set_optimizer_state(arrays))

    @_rpc("GetStatus")
    def GetStatus(  # noqa: N802
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        """Version, rounds, workers, pending pushes, settings, payload bytes."""
        received, sent = self._metrics.payload_bytes()
        return messages.status_response(
            self._core.status(), received_bytes=received, sent_bytes=sent
        )

    # -- snapshots ---------------------------------------------------------------------------

    @_rpc("CreateSnapshot")
    def CreateSnapshot(  # noqa: N802
        self, request: pb.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.SnapshotInfo:
        """Take a snapshot on the server's disk."""
        self._core.require_accepting()
        info = self._core.take_snapshot(
            trigger="rpc",
            cut=messages.snapshot_cut(request),
            at_version=request.at_version,
            timeout_s=_remaining_s(context),
        )
        return messages.snapshot_info(info)

    @_rpc("HoldUpdates")
    def HoldUpdates(  # noqa: N802
        self, request: pb.HoldUpdatesRequest, context: grpc.ServicerContext
    ) -> pb.HoldUpdatesResponse:
        """Apply no update for a while (a sharded snapshot's cut); 0 releases."""
        return pb.HoldUpdatesResponse(version=self._core.hold_updates(request.hold_s))

    @_rpc("ListSnapshots")
    def ListSnapshots(  # noqa: N802
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> pb.ListSnapshotsResponse:
        """The snapshots on the server's disk."""
        infos = self._core.list_snapshots()
        return pb.ListSnapshotsResponse(snapshots=[messages.snapshot_info(i) for i in infos])

    @_rpc("RestoreSnapshot")
    def RestoreSnapshot(  # noqa: N802
        self, request: pb.RestoreSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.RestoreSnapshotResponse:
        """Validate a snapshot, then swap it in."""
        self._core.require_accepting()
        info = self._core.restore_snapshot(request.id, validate_only=request.validate_only)
        return pb.RestoreSnapshotResponse(snapshot=messages.snapshot_info(info))

    @_rpc("DownloadSnapshot")
    def DownloadSnapshot(  # noqa: N802
        self, request: pb.DownloadSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FileChunk]:
        """Stream a snapshot file out."""
        sent = 0
        for chunk in streams.file_chunks(self._core.snapshot_path(request.id), self._chunk_bytes):
            yield chunk
            sent += len(chunk.data)
        self._metrics.bytes_sent.labels(method="DownloadSnapshot").inc(sent)

    @_rpc("UploadSnapshot")
    def UploadSnapshot(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> pb.UploadSnapshotResponse:
        """Store an uploaded snapshot and, if asked, restore it."""
        self._core.require_accepting()
        self._core.require_snapshots()
        header = streams.first_item(request_iterator, "header", "UploadSnapshotHeader")
        messages.check_upload_size(
            header.size_bytes,
            self._limits,
            shards=header.reshard.shards if header.HasField("reshard") else 1,
        )
        chunks = streams.UploadChunks(request_iterator, header.size_bytes, context)
        reshard = None
        if header.HasField("reshard"):
            r = header.reshard
            reshard = ReshardRequest(
                manifest=r.manifest,
                shards=r.shards,
                shard_index=r.shard_index,
                cut_id=r.cut_id,
                split_threshold_bytes=r.split_threshold_bytes,
            )
        info, restored = self._core.upload_snapshot(
            iter(chunks), size_bytes=header.size_bytes, restore=header.restore, reshard=reshard
        )
        self._received["UploadSnapshot"].inc(chunks.received)
        logger.info("snapshot %s uploaded (%d bytes)", info.id, info.size_bytes)
        return pb.UploadSnapshotResponse(snapshot=messages.snapshot_info(info), restored=restored)
