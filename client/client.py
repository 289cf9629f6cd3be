"""Client: the SDK's connection to one paramserve daemon, NumPy arrays in and out.

>>> with Client("127.0.0.1:50051") as ps:
...     ps.create_model({"w": np.zeros((4, 2), np.float32)}, optimizer="adam")
...     weights = ps.pull()                    # {"w": array}, weights.version == 0
...     ps.push({"w": grad})                   # base_version = the last pull's version

Every call has a deadline (``timeout_s``, per client and per call). Calls that are safe to
repeat (pulls, status and other reads, and pushes and steps, which the server deduplicates)
are resent by the SDK when they fail in transit: a lost or reset connection, a server that is
unreachable, restarting or draining (UNAVAILABLE, a CANCELLED this client did not cause, a
stream reset without a status), with exponential backoff and jitter, until they succeed or
the deadline is spent (:mod:`paramserve.client.resend`; gRPC's own retries are off, see
:mod:`paramserve.client.channel` for why). A server this client has never reached is not
waited for unless asked (``wait_for_server_s``): the first call that cannot connect raises an
UnavailableError naming the address and the cause (connection refused, unknown host, TLS).
A push is resent whole, re-read from the caller's arrays, with the same
``(worker_id, sequence, session)`` and ``base_version``, so the server applies it exactly
once whatever the link does. Failures raise
:class:`~paramserve.client.ParamServeError` subclasses; one that gave up on resending names
the server address, the attempts and the last transport error.

Small models: :meth:`Client.step` pushes and pulls in one round trip (RemoteOptimizer uses
it by itself below 1 MiB each way). Large tensors: ``pull(out=...)`` receives into the
caller's arrays, and a worker process may opt in to glibc allocator settings that reuse
tensor-sized buffers (``paramserve.wire.tune_malloc()`` once at start, or
``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_ARENA_MAX=1`` in
its environment): at 16M floats per step it cut the worker's CPU by ~20%. The SDK never
changes the allocator by itself.

Exactly-once pushes: each push carries ``(worker_id, sequence)``, the sequence strictly
increasing per client. A client with an explicit ``worker_id`` first reads that worker's
``last_sequence`` from the server and continues after it, so a restarted worker rejoins
without its new pushes being taken for duplicates of its old ones.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import secrets
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb
from paramserve.wire import (
    CHUNK_BYTES,
    DEFAULT_ADDRESS,
    STEP_CLIENT_OVERHEAD_BYTES,
    SparseRows,
    header_for,
    json_default,
    length_delimited,
    payload_bytes,
    step_reply_bytes,
    step_request_bytes,
    whole_payload,
    wire_dtype_code,
)

from .channel import ChannelSettings, method_path, open_channel, tls_credentials
from .compression import ErrorFeedback, widen
from .errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from .resend import RESENT_METHODS, ResendPolicy, call_with_resends
from .results import (
    CreateModelResult,
    ModelDescription,
    PushResult,
    ServerStatus,
    SnapshotInfo,
    Tensors,
)
from .streams import (
    ReplyLayouts,
    StripesUnusable,
    all_arrays,
    as_host_array,
    cast_gradient,
    check_out_array,
    decode_stream_item,
    merged_request_stream,
    named_values,
    receive_buffer,
    receive_inline,
    receive_stripes,
    receive_tensors,
    request_stream,
    tensor_headers,
)
from .transfer import progress_bar, upload_requests, write_download
from .unreachable import Reachability

if TYPE_CHECKING:  # imported where needed: `paramserve status` never loads the optimizers
    from paramserve import optim_core

R = TypeVar("R")
_FLOAT32 = {np.dtype(np.float32)}
# C-level helpers for the per-variable passes of a push (a model may have 1,000 variables).
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")


class _ClientSetting:
    """The default of a call's ``wire_dtype``: the client's own setting."""

    def __repr__(self) -> str:
        return "CLIENT_SETTING"


CLIENT_SETTING: Any = _ClientSetting()


# Striped pulls: each stripe past the first on a channel (a TCP connection) of its own, not
# on the client's channel (HTTP/2 streams of one connection).
STRIPE_CHANNELS = False
# Selections whose payload size (that of their last pull) is remembered for striping
# (cleared when full).
_PULL_SIZES_MAX = 64


def auto_pull_streams(payload_bytes: int, cpus: int) -> int:
    """The streams ``pull_streams="auto"`` stripes a pull of ``payload_bytes`` over on a
    machine of ``cpus`` CPUs: 1 everywhere, as measured so far (docs/benchmarks.md: on 2
    CPUs, 2 and 4 streams were no faster at 4 MiB and slower at 64 MiB; no larger machine
    measured yet)."""
    return 1


@functools.cache
def _cpus() -> int:
    """CPUs this process may run on (asked once: a system call per pull otherwise)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def check_pull_streams(value: Any) -> int | str:
    """A ``pull_streams`` setting: an int from 1 to 64, or "auto" (ValueError otherwise);
    strings of digits are read as numbers (the environment variable)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(
            f"pull_streams must be a number of streams from 1 to 64, or 'auto'. "
            f"Received: {value!r}"
        )
    return value


def default_worker_id() -> str:
    """``{hostname}-{pid}-{4 random hex digits}``: unique per process, readable in status."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def _push_result(response: pb.PushResponse, sequence: int) -> PushResult:
    return PushResult(
        duplicate=response.duplicate,
        version=response.version,
        contributors=response.contributors,
        sequence=sequence,
        applied=response.applied,
    )


def optimizer_json(
    optimizer: str | dict[str, Any] | optim_core.Optimizer | None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The wire form of an optimizer: a Keras serialization dict as JSON ("" = server default).

    Names and instances are serialized with optim_core, so the server receives every
    setting, weight-decay exclusions included (arrays excluded by identity are named after
    the entry of ``variables`` they are); dicts (ours or from ``keras.optimizers.serialize``)
    travel as given. A callable learning rate cannot travel: TypeError, before anything is
    sent.
    """
    if optimizer is None:
        return ""
    if isinstance(optimizer, dict):
        return json.dumps(optimizer, default=json_default)
    from paramserve import optim_core

    if isinstance(optimizer, str | optim_core.Optimizer):
        instance = optim_core.get(optimizer)
        paths_by_id = {id(_array_of(v)): name for name, v in (variables or {}).items()}
        config = optim_core.serialize(instance, paths_by_id=paths_by_id)
        check_sendable(config)
        return json.dumps(config, default=json_default)
    raise TypeError(
        "optimizer must be a name, a Keras serialization dict or an optim_core optimizer. "
        f"Received: {optimizer!r}"
    )


def _snapshot_id(snapshot: str | SnapshotInfo) -> str:
    """The id of a snapshot given as its id or as a SnapshotInfo; TypeError otherwise."""
    if isinstance(snapshot, SnapshotInfo):
        return snapshot.id
    if isinstance(snapshot, str):
        return snapshot
    raise TypeError(
        "A snapshot is named by its id (a str such as 'snap-000000000042-...Z') or by the "
        f"SnapshotInfo that snapshot() and list_snapshots() return. Received: {snapshot!r}"
    )


def _array_of(value: Any) -> Any:
    from paramserve import optim_core

    return value.value if isinstance(value, optim_core.Variable) else value


def check_sendable(
    config: dict[str, Any], *, schedules: str = "paramserve.optim_core.schedules"
) -> None:
    """TypeError for settings that cannot be rebuilt on the server: a learning rate that is a
    Python callable (serialized as a function or a lambda), here or in an inner optimizer.
    ``schedules`` names the schedule classes the message suggests instead."""
    options = config.get("config") or {}
    inner = options.get("inner_optimizer")
    if isinstance(inner, dict):
        check_sendable(inner, schedules=schedules)
    lr = options.get("learning_rate")
    if isinstance(lr, dict) and lr.get("class_name") in {"function", "__lambda__"}:
        raise TypeError(
            f"The optimizer's learning rate is a Python callable ({lr.get('config')}), which "
            f"cannot be sent to the server. Use a learning-rate schedule ({schedules}; the "
            "server evaluates Keras's built-in schedules) or a float, and change it live with "
            "Client.set_hyperparameters(learning_rate=...)."
        )


def _wait_from_environment() -> float:
    """``$PARAMSERVE_WAIT_FOR_SERVER_S`` in seconds (0 when unset or empty)."""
    text = os.environ.get("PARAMSERVE_WAIT_FOR_SERVER_S", "").strip()
    try:
        return float(text) if text else 0.0
    except ValueError:
        raise ValueError(
            f"PARAMSERVE_WAIT_FOR_SERVER_S must be a number of seconds. Received: {text!r}"
        ) from None


class Client:
    """A connection to one parameter server; thread-safe, close it (or use ``with``).

    ``Client([address, ...])`` (a list of shard addresses, shard 0 first) is one sharded
    job with the same methods: a :class:`~paramserve.client.sharded.ShardedClient`.
    """

    def __new__(cls, address: str | Sequence[str] = DEFAULT_ADDRESS, *args: Any, **kwargs: Any):
        """A :class:`ShardedClient` for a sequence of addresses, else a plain one."""
        if cls is Client and not isinstance(address, str | bytes) and isinstance(address, Sequence):
            from .sharded import ShardedClient

            return super().__new__(ShardedClient)
        return super().__new__(cls)

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        worker_id: str | None = None,
        timeout_s: float = 60.0,
        chunk_bytes: int = CHUNK_BYTES,
        max_message_bytes: int = 64 << 20,
        keepalive_time_s: float = 30.0,
        retry_max_attempts: int | None = None,
        wait_for_ready: bool = True,
        wait_for_server_s: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        strict_dtypes: bool = False,
        wire_dtype: str | None = None,
        error_feedback: bool = True,
        pull_streams: int | str | None = None,
    ) -> None:
        """Connect lazily to ``address`` (``host:port``).

        Unreachable server: a call that cannot connect (connection refused, unknown host, TLS
        handshake failed) raises :class:`~paramserve.client.UnavailableError` within
        moments, naming the address and the cause, as long as no call of this client has
        reached the server yet. ``wait_for_server_s`` waits that long for a server that is
        still starting instead, trying to connect again with backoff (a call made then gets
        at least that long as its deadline); None (default) reads
        ``$PARAMSERVE_WAIT_FOR_SERVER_S``, else 0.

        Once the server was reached, ``wait_for_ready`` (on by default) makes calls wait,
        within their deadline, for a server that went away or is restarting, so a worker
        rides out a daemon restart (each failed attempt is logged: a warning, then info
        lines); pass False to fail fast (admin tools do).

        Resending (see the module docstring): ``retry_max_attempts`` caps the attempts of one
        call, the first included; None (default) resends until the deadline is spent with
        ``wait_for_ready``, and makes at most 5 attempts without it (fail fast).

        Security: ``token`` (default ``$PARAMSERVE_TOKEN``) is sent as ``authorization: Bearer``
        metadata. Any of ``tls_ca`` (PEM file of the CA that signed the server's certificate;
        None with a client certificate: the system's roots), ``tls_cert`` and ``tls_key`` (this
        client's certificate, for mutual TLS) turns on TLS; ``credentials``
        (``grpc.ssl_channel_credentials(...)``) is the escape hatch for anything else.

        Gradient dtypes: :meth:`push` and :meth:`step` cast a floating-point gradient to its
        variable's floating-point dtype (float64 to float32, ...), as Keras does; with
        ``strict_dtypes=True`` such a gradient is a TypeError naming the variable and both
        dtypes instead, before anything is sent. Integer, boolean and complex gradients for
        a floating-point variable are always refused (TypeError).

        Fewer bytes on the wire: ``wire_dtype="bfloat16"`` or ``"float16"`` sends dense
        gradients of float32 variables rounded to that dtype, and has pulls return float32
        weights rounded to it (upcast back to float32 here); each call can override it
        (``push(..., wire_dtype=None)`` is exact). The server keeps and applies float32.
        ``error_feedback`` (on by default) adds each variable's rounding residual into its
        next compressed push (see :mod:`paramserve.client.compression`); the residuals reset
        when this client creates a new model, deletes it or restores a snapshot. float16:
        a finite gradient beyond 65504 is refused (``Float16OverflowError``, a ValueError)
        before anything is sent.

        Striped pulls: ``pull_streams=K`` (K >= 2) pulls weights of at least two chunks
        (``chunk_bytes`` each) over up to K concurrent streams (a chunk or more each), each
        carrying a contiguous part of the payload, once an earlier pull of the same
        selection told their size; the parts are checked to be of one version (else the pull
        is made again whole) and written into place as they arrive. ``1``: one stream.
        ``"auto"``: the SDK's choice (:func:`auto_pull_streams`: one stream, as measured so
        far). None (default) reads ``$PARAMSERVE_PULL_STREAMS`` (a number or ``auto``), else
        ``"auto"``. Each :meth:`pull` can override it (``streams=``).
        """
        wire_dtype_code(wire_dtype)  # ValueError for anything but bfloat16, float16, None
        if pull_streams is None:
            pull_streams = os.environ.get("PARAMSERVE_PULL_STREAMS", "").strip() or "auto"
        self.pull_streams = check_pull_streams(pull_streams)
        if chunk_bytes < 1 or chunk_bytes > max_message_bytes - 1024:
            raise ValueError(
                f"chunk_bytes must be in [1, max_message_bytes - 1024]. "
                f"Received: chunk_bytes={chunk_bytes}, max_message_bytes={max_message_bytes}"
            )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0. Received: timeout_s={timeout_s}")
        if wait_for_server_s is None:
            wait_for_server_s = _wait_from_environment()
        if wait_for_server_s < 0:
            raise ValueError(
                f"wait_for_server_s must be >= 0. Received: wait_for_server_s={wait_for_server_s}"
            )
        if retry_max_attempts is None:
            retry_max_attempts = None if wait_for_ready else 5
        self._resend_policy = ResendPolicy(max_attempts=retry_max_attempts)
        self.address = address
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self._wait_for_ready = wait_for_ready
        self.strict_dtypes = strict_dtypes
        self.wire_dtype = wire_dtype
        self.error_feedback = ErrorFeedback(enabled=error_feedback)
        self.worker_id = worker_id if worker_id is not None else default_worker_id()
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        self._metadata = tuple(metadata)
        if token is None:
            token = os.environ.get("PARAMSERVE_TOKEN", "").strip() or None
        if token is not None:
            self._metadata += (("authorization", f"Bearer {token}"),)
        settings = ChannelSettings(
            max_message_bytes=max_message_bytes, keepalive_time_s=keepalive_time_s
        )
        if tls_ca is not None or tls_cert is not None or tls_key is not None:
            if credentials is not None:
                raise ValueError("pass either credentials or tls_ca/tls_cert/tls_key, not both")
            credentials = tls_credentials(ca=tls_ca, cert=tls_cert, key=tls_key)
        self._channel = open_channel(address, settings, credentials=credentials)
        self._reach = Reachability(
            address, tls=credentials is not None, wait_for_server_s=wait_for_server_s
        )
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        # Tensor streams bypass protobuf serialization of chunks (see streams.py).
        ch = self._channel
        self._create_model = ch.stream_unary(
            method_path("CreateModel"), response_deserializer=pb.CreateModelResponse.FromString
        )
        self._push = ch.stream_unary(
            method_path("Push"), response_deserializer=pb.PushResponse.FromString
        )
        self._set_optimizer_state = ch.stream_unary(
            method_path("SetOptimizerState"),
            response_deserializer=pb.SetOptimizerStateResponse.FromString,
        )
        self._pull = ch.unary_stream(
            method_path("Pull"),
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=decode_stream_item,
        )
        # Striped pulls: the channel of each stripe past the first (the client's own channel,
        # or channels of their own with STRIPE_CHANNELS), the threads that receive them, the
        # payload bytes of the last pull of each selection, and whether the server stripes.
        self._channel_args = (address, settings, credentials)
        self._own_stripe_channels = STRIPE_CHANNELS
        self._stripe_pulls: list[Callable[..., Any]] = []
        self._stripe_channels: list[grpc.Channel] = []
        self._stripe_pool: ThreadPoolExecutor | None = None
        self._stripe_workers = 0
        self._pull_sizes: dict[bytes, int] = {}
        self._server_stripes = True
        self._lock = threading.Lock()
        self._closed = False
        self._resends = 0
        self._resends_lock = threading.Lock()
        # This client instance: its resends carry it, so the server tells them apart from
        # another client reusing the worker's sequences.
        self.session = secrets.token_hex(8)
        self._sequence = 0
        # An explicit worker_id may have pushed before (a restarted worker): continue
        # after the server's last_sequence for it, read before the first push.
        self._sequence_synced = worker_id is None
        self._base_version = 0
        self._description: ModelDescription | None = None
        # Checked reply header lists (pulls of the same variables every step).
        self._reply_layouts = ReplyLayouts()
        # The serialized tensors part of the last push's header, with what it describes.
        self._push_tensors: tuple[tuple[list[Any], ...], bytes] | None = None
        # Whether the server said (in its last Push reply) that it reads merged items: a
        # push's header and end in the messages of its first and last chunks.
        self._merged_pushes = False
        self._float32_model: tuple[ModelDescription, bool] | None = None
        self._last_out: Mapping[str, np.ndarray] | None = None
        # (checked out mapping, description, its arrays a compressed pull widens into)
        self._widen_targets: tuple[Any, Any, Mapping[str, np.ndarray]] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel; calls in flight are cancelled (and not resent)."""
        self._closed = True
        self._channel.close()
        for channel in self._stripe_channels:
            channel.close()
        if self._stripe_pool is not None:
            self._stripe_pool.shutdown(wait=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(address={self.address!r}, worker_id={self.worker_id!r})"

    # --- plumbing --------------------------------------------------------------------------
    def _deadline(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    @property
    def wait_for_server_s(self) -> float:
        """How long a call waits for a server this client has not reached yet (seconds)."""
        return self._reach.wait_for_server_s

    @property
    def resends(self) -> int:
        """Attempts this client made again after a call failed in transit (all calls)."""
        return self._resends

    def _count_resend(self) -> None:
        with self._resends_lock:
            self._resends += 1

    def _run(self, method: str, attempt: Callable[[float], R], timeout_s: float | None) -> R:
        """The one place calls are made: ``attempt(seconds_left)`` through the resend loop
        (resent only for :data:`~paramserve.client.resend.RESENT_METHODS`), failures mapped
        to :class:`~paramserve.client.ParamServeError`."""
        return call_with_resends(
            method,
            attempt,
            timeout_s=self._deadline(timeout_s),
            address=self.address,
            policy=self._resend_policy,
            resend=method in RESENT_METHODS,
            closed=lambda: self._closed,
            on_resend=self._count_resend,
            reach=self._reach,
        )

    def _options(self, seconds_left: float) -> dict[str, Any]:
        return {
            "timeout": seconds_left,
            "metadata": self._metadata,
            # Never gRPC's wait: a call that cannot connect fails at once with the cause,
            # and the resend loop decides whether to wait (see wait_for_server_s).
            "wait_for_ready": False,
        }

    def _call(
        self, method: str, stub: Callable[..., R], request: Any, timeout_s: float | None
    ) -> R:
        """A unary call (or a client stream a method will not resend) with one request."""
        return self._run(method, lambda left: stub(request, **self._options(left)), timeout_s)

    def _send_stream(
        self,
        method: str,
        stub: Callable[..., R],
        requests: Callable[[], Iterator[Any]],
        timeout_s: float | None,
    ) -> R:
        """A client-streaming call: ``requests()`` builds each attempt's stream anew."""
        return self._run(method, lambda left: stub(requests(), **self._options(left)), timeout_s)

    def _receive_stream(
        self,
        method: str,
        stub: Callable[..., Iterable[Any]],
        request: Any,
        consume: Callable[[Iterator[Any]], R],
        timeout_s: float | None,
    ) -> R:
        """A server-streaming call, ``consume``-d whole by each attempt (a resend starts
        over). A consumer that stops early (a malformed stream, a failed write) cancels it."""

        def attempt(left: float) -> R:
            responses: Any = stub(request, **self._options(left))
            try:
                return consume(responses)
            finally:
                responses.cancel()

        return self._run(method, attempt, timeout_s)

    def _variable_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a model variable, for sparse-row headers (described once, then cached)."""
        spec = self._description.spec(name) if self._description is not None else None
        if spec is None:  # not described yet, or the model changed since
            spec = self.describe().spec(name)
        if spec is None:
            raise NotFoundError(f"the model has no variable {name!r}")
        return spec.shape

    def _all_float32(self, description: ModelDescription) -> bool:
        """Whether every variable of ``description`` is float32 (kept per description)."""
        cached = self._float32_model
        if cached is None or cached[0] is not description:
            every = all(v.numpy_dtype == np.float32 for v in description.variables)
            self._float32_model = cached = (description, every)
        return cached[1]

    def _checked_out(self, out: Mapping[str, np.ndarray] | None) -> Mapping[str, np.ndarray]:
        """``out`` with every array checked (:func:`check_out_array`), read-only; the same
        arrays as the last pull's are not checked again (the same mapping comes back)."""
        if not out:
            return {}
        last = self._last_out
        if (
            last is not None
            and len(last) == len(out)
            and all(map(operator.is_, map(last.get, out), out.values()))
        ):
            return last
        checked = MappingProxyType({n: check_out_array(n, a) for n, a in out.items()})
        self._last_out = checked
        return checked

    def _cast_gradients(self, names: list[str], values: list[Any]) -> list[Any]:
        """Gradients in their variables' dtypes (see ``strict_dtypes``); checked before
        anything is sent. Variables the model lacks are left for the server to refuse.

        The model is described (once; the description is cached) only when a gradient is
        not float32: float32 gradients, the common case, go out without that extra call,
        and the server itself refuses one whose variable has another dtype.
        """
        description = self._description
        if all_arrays(values):  # arrays only (the common case)
            dtypes = set(map(_DTYPE, values))
        else:
            dtypes = {v.dtype if type(v) is np.ndarray else v.values.dtype for v in values}
        if dtypes == _FLOAT32 and (description is None or self._all_float32(description)):
            return values
        if description is None or any(description.spec(n) is None for n in names):
            try:
                description = self.describe()
            except NotFoundError:  # no model yet: the push's own answer says so
                return values
        return [
            cast_gradient(n, v, spec.numpy_dtype, strict=self.strict_dtypes)
            if (spec := description.spec(n)) is not None
            else v
            for n, v in zip(names, values, strict=True)
        ]

    # --- model ------------------------------------------------------------------------------
    def create_model(
        self,
        variables: Mapping[str, Any] | Sequence[optim_core.Variable],
        optimizer: str | dict[str, Any] | optim_core.Optimizer | None = "adam",
        *,
        name: str = "model",
        timeout_s: float | None = None,
    ) -> CreateModelResult:
        """Create the model from initial values (a ``{name: array}`` dict, or Variables
        named by their ``path``) and an optimizer (name, Keras config dict, optim_core
        instance, or None for the server's default). Idempotent for the same definition."""
        if not isinstance(variables, Mapping):
            from paramserve import optim_core

            if not all(isinstance(v, optim_core.Variable) for v in variables):
                raise TypeError("variables must be a {name: array} dict or a list of Variables")
            variables = {v.path: v for v in variables}
        names = list(variables)
        arrays = [as_host_array(variables[n]) for n in names]
        header = pb.CreateModelHeader(
            model_name=name,
            optimizer_json=optimizer_json(optimizer, variables),
            variables=tensor_headers(names, arrays),
        )
        first = pb.CreateModelRequest(header=header).SerializeToString()
        response = self._send_stream(
            "CreateModel",
            self._create_model,
            lambda: request_stream(first, arrays, chunk_bytes=self.chunk_bytes),
            timeout_s,
        )
        self._description = None
        if response.created:
            self.error_feedback.reset()
            self._base_version = response.version
        elif not response.values_match:
            warnings.warn(
                f"The model {name!r} already exists on {self.address} (version "
                f"{response.version}) with other weights than the values passed to "
                "create_model(); pull() them before computing gradients, or the first push "
                "trains from this worker's own weights.",
                stacklevel=2,
            )
        return CreateModelResult(response.created, response.version, response.values_match)

    def delete_model(self, *, timeout_s: float | None = None) -> None:
        """Drop the model and its optimizer state (snapshots on disk stay)."""
        self._call("DeleteModel", self._stub.DeleteModel, pb.DeleteModelRequest(), timeout_s)
        self._description = None
        self.error_feedback.reset()

    def describe(self, *, timeout_s: float | None = None) -> ModelDescription:
        """Variables (model order), optimizer config, hyperparameters, version, aggregation."""
        response = self._call("Describe", self._stub.Describe, pb.DescribeRequest(), timeout_s)
        self._description = ModelDescription.from_proto(response)
        return self._description

    # --- training -----------------------------------------------------------------------
    @property
    def base_version(self) -> int:
        """Version of the weights last pulled (or created) by this client: what a push
        defaults to as the version its gradients were computed from."""
        return self._base_version

    @property
    def last_sequence(self) -> int:
        """Sequence of the last push sent; pass it to ``push(sequence=...)`` to resend."""
        return self._sequence

    def _next_sequence(self, forced: int | None) -> int:
        with self._lock:
            if forced is not None:
                if forced < 1:
                    raise ValueError(f"sequence must be >= 1. Received: sequence={forced}")
                self._sequence = max(self._sequence, forced)
                return forced
            if not self._sequence_synced:
                self._sequence = max(self._sequence, self._server_last_sequence())
                self._sequence_synced = True
            self._sequence += 1
            return self._sequence

    def _server_last_sequence(self) -> int:
        """The last sequence the server holds for this worker (0: none), where a client
        that restarted under the same worker id carries on from."""
        worker = self.status().worker(self.worker_id)
        return worker.last_sequence if worker is not None else 0

    def _push_tensors_part(self, names: list[str], values: list[Any]) -> bytes:
        """``PushHeader(tensors=...)`` serialized for these gradients; kept for the next push
        whose dense gradients have the same names, dtypes and shapes (a worker pushes the
        same every step), so their headers are built once."""
        if not all_arrays(values):  # sparse rows: built afresh
            headers = tensor_headers(names, values, self._variable_shape)
            return pb.PushHeader(tensors=headers).SerializeToString()
        # Compared as three lists, each built and compared in C (dtypes are shared objects,
        # so they compare by identity): about half the time of one tuple of pairs.
        key = (names, list(map(_SHAPE, values)), list(map(_DTYPE, values)))
        cached = self._push_tensors
        if cached is not None and cached[0] == key:
            return cached[1]
        headers = tensor_headers(names, values, self._variable_shape)
        body = pb.PushHeader(tensors=headers).SerializeToString()
        self._push_tensors = ((list(names), *key[1:]), body)  # (a copy of the caller's list)
        return body

    def _push_header(
        self,
        sequence: int,
        base_version: int,
        headers: list[tpb.TensorHeader],
        wire_dtype: str | None = None,
        prepare: bool = False,
    ) -> pb.PushHeader:
        """This client's identity (worker, session, sequence) and the tensors of one push."""
        return pb.PushHeader(
            worker_id=self.worker_id,
            sequence=sequence,
            base_version=base_version,
            tensors=headers,
            session=self.session,
            wire_dtype=wire_dtype_code(wire_dtype),
            prepare=prepare,
        )

    def _wire_dtype(self, wire_dtype: Any) -> str | None:
        """A call's wire dtype: its own, or the client's (ValueError for unknown ones)."""
        chosen = self.wire_dtype if wire_dtype is CLIENT_SETTING else wire_dtype
        wire_dtype_code(chosen)
        return chosen

    def _compressed_push(
        self,
        names: list[str],
        values: list[Any],
        wire_dtype: str | None,
        send: Callable[[list[Any]], R],
        taken: Callable[[R], bool],
    ) -> R:
        """``send(values as they travel)``; compressed ones with error feedback, whose new
        residuals are kept when ``taken(result)``."""
        if wire_dtype is None:
            return send(values)
        compressed, made = self.error_feedback.compress(names, values, wire_dtype)
        ok = False
        try:
            result = send(compressed)
            ok = taken(result)
            return result
        finally:
            self.error_feedback.finish(made, taken=ok)

    def _widened_on_arrival(self, out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays of ``out`` a compressed pull may widen its weights into as they arrive:
        float32 ones of float32 variables (as the described model says; none before it was
        described, when :meth:`_widened` does it after)."""
        description = self._description
        if description is None or not out:
            return {}
        cached = self._widen_targets
        if cached is not None and cached[0] is out and cached[1] is description:
            return cached[2]  # the same checked arrays and description as last time
        targets = MappingProxyType(
            {
                name: array
                for name, array in out.items()
                if array.dtype == np.float32
                and (spec := description.spec(name)) is not None
                and spec.numpy_dtype == np.float32
            }
        )
        self._widen_targets = (out, description, targets)
        return targets

    def _widened(self, tensors: Tensors, out: Mapping[str, np.ndarray] | None = None) -> Tensors:
        """A compressed pull's weights back in float32 for the float32 variables, those
        named in ``out`` written into those arrays (checked as a direct pull checks them)."""
        description = self._description
        if description is None or any(description.spec(n) is None for n in tensors):
            description = self.describe()
        out = out or {}
        for name, value in tensors.items():
            spec = description.spec(name)
            got = value.values.dtype if isinstance(value, SparseRows) else value.dtype
            if spec is not None and spec.numpy_dtype == np.float32 and got != np.float32:
                if name in out and not isinstance(value, SparseRows):
                    target = out[name]
                    if target.dtype != np.float32 or target.shape != value.shape:
                        raise ValueError(
                            f"out[{name!r}] is {target.dtype.name} {list(target.shape)}, but "
                            f"the variable is float32 {list(value.shape)}"
                        )
                    tensors[name] = widen(value, into=target)
                else:
                    tensors[name] = widen(value)
            elif name in out and value is not out[name]:  # (not widened on arrival)
                receive_buffer(header_for(name, value), out[name])
                np.copyto(out[name], value)
                tensors[name] = out[name]
        return tensors

    def _sequenced(self, forced: int | None, send: Callable[[int], R]) -> tuple[int, R]:
        """``send(sequence)`` with the next sequence (or ``forced``), and that sequence.

        If the server refuses an automatic sequence because this worker_id already pushed
        that far (another client with the same worker_id took those numbers, or the counter
        was read before a restore moved the table forward), the counter resynchronises from
        the server's ``last_sequence`` and the push is sent once more with the next number.
        A ``forced`` sequence is the caller's to manage: its refusal is raised.
        """
        seq = self._next_sequence(forced)
        try:
            return seq, send(seq)
        except FailedPreconditionError as exc:
            if forced is not None or exc.reason != "SEQUENCE_REGRESSED":
                raise
            last = int(exc.metadata.get("last_sequence", seq))
        with self._lock:
            self._sequence = max(self._sequence, last)
        seq = self._next_sequence(None)
        return seq, send(seq)

    def push(
        self,
        grads: Mapping[str, Any],
        *,
        base_version: int | None = None,
        sequence: int | None = None,
        timeout_s: float | None = None,
        wire_dtype: str | None = CLIENT_SETTING,
    ) -> PushResult:
        """Push gradients for any subset of variables; returns once they took effect.

        Values are dense arrays of the variable's dtype and shape, or sparse rows:
        ``SparseRows``, ``IndexedSlices`` or an ``(indices, values)`` tuple. In sync mode
        the call blocks until the round closes. ``sequence`` resends an earlier push
        (the server acknowledges it as a duplicate if it already took effect).

        A push that fails in transit is resent by the SDK itself, within the deadline, with
        the same sequence, session and base version; each attempt reads the arrays in
        ``grads`` again (no copy of them is kept), so they must not change until this returns.

        ``wire_dtype`` ("bfloat16", "float16", or None for exact float32; default: the
        client's) compresses dense float32 gradients, with error feedback (see
        :class:`Client`); a compressed push is resent from its compressed copy.
        """
        return self._push_grads(grads, base_version, sequence, timeout_s, wire_dtype)

    def _push_grads(
        self,
        grads: Mapping[str, Any],
        base_version: int | None,
        sequence: int | None,
        timeout_s: float | None,
        wire_dtype: str | None,
        *,
        prepare: bool = False,
    ) -> PushResult:
        """:meth:`push`; ``prepare`` holds it on a shard of a sharded sync job (see
        :mod:`.sharded`), with ``applied`` False when that shard dropped it as non-finite."""
        wire_dtype = self._wire_dtype(wire_dtype)
        names, values = named_values(grads)
        values = self._cast_gradients(names, values)
        base = self._base_version if base_version is None else base_version

        def push_values(values: list[Any]) -> tuple[int, pb.PushResponse]:
            tensors = self._push_tensors_part(names, values)

            def send(seq: int) -> pb.PushResponse:
                # The PushHeader: the tensors' part kept from the last push of the same
                # gradients' names, dtypes and shapes, the rest serialized now (protobuf
                # reads the two as one message).
                own = self._push_header(seq, base, [], wire_dtype, prepare).SerializeToString()
                header = tensors + own
                if self._merged_pushes:
                    try:
                        return self._send_push(header, values, timeout_s, merged=True)
                    except InvalidArgumentError as exc:
                        # A server that does not read merged items (an older one now at
                        # this address) takes the first message for a chunk and refuses
                        # the stream, applying nothing: once more as separate items.
                        if "must be a PushHeader, got chunk" not in str(exc):
                            raise
                        self._merged_pushes = False
                return self._send_push(header, values, timeout_s, merged=False)

            return self._sequenced(sequence, send)

        seq, response = self._compressed_push(
            names, values, wire_dtype, push_values, lambda r: r[1].applied or r[1].duplicate
        )
        return _push_result(response, seq)

    def _send_push(
        self, header: bytes, values: list[Any], timeout_s: float | None, *, merged: bool
    ) -> pb.PushResponse:
        """One push's stream (resent whole on a failure in transit): ``header`` (a serialized
        PushHeader), the gradients' chunks and the end, the header and the end in the first
        and last chunks' messages when ``merged``. Its reply tells whether the server reads
        merged items, for the next push."""
        first = length_delimited(1, header)

        def items() -> Iterator[bytes]:
            if merged:
                return merged_request_stream(header, values, chunk_bytes=self.chunk_bytes)
            return request_stream(first, values, chunk_bytes=self.chunk_bytes)

        response = self._send_stream("Push", self._push, items, timeout_s)
        self._merged_pushes = response.reads_merged_items
        return response

    def _commit_round(
        self,
        sequence: int,
        base_version: int,
        *,
        skipped: bool,
        timeout_s: float | None,
    ) -> tuple[PushResult, pb.RoundDecision | None]:
        """Commit a prepared push to a sharded sync job's coordinator (this client's
        server): the push's outcome once its round closed, and the round's decision."""
        request = pb.CommitRoundRequest(
            worker_id=self.worker_id,
            sequence=sequence,
            session=self.session,
            base_version=base_version,
            skipped=skipped,
        )
        response = self._call("CommitRound", self._stub.CommitRound, request, timeout_s)
        decision = response.decision if response.HasField("decision") else None
        return _push_result(response.push, sequence), decision

    def _apply_round(self, decision: pb.RoundDecision, *, timeout_s: float | None) -> int:
        """Hand a sharded round's decision to this shard; its version after it."""
        request = pb.ApplyRoundRequest(decision=decision)
        return self._call("ApplyRound", self._stub.ApplyRound, request, timeout_s).version

    def step(
        self,
        grads: Mapping[str, Any],
        *,
        names: Sequence[str] | None = None,
        rows: Mapping[str, Sequence[int] | np.ndarray] | None = None,
        base_version: int | None = None,
        sequence: int | None = None,
        timeout_s: float | None = None,
        wire_dtype: str | None = CLIENT_SETTING,
    ) -> Tensors:
        """Push ``grads`` and pull weights in one round trip: ``push()`` then ``pull()``.

        For small models: the gradients and the weights travel inline in one message each
        way, which saves a round trip and the stream set-up. The push has :meth:`push`'s
        semantics (exactly once, sync rounds: blocks until the round closes); the weights
        (``names``/``rows`` as in :meth:`pull`; all by default) are read after the push took
        effect, at one version. The result's ``push_result`` is the push's outcome.

        Raises ValueError, before anything is sent, if the request or the reply would not
        fit one message (``max_message_bytes``); use :meth:`push` and :meth:`pull` then.
        ``wire_dtype`` compresses both the gradients and the weights (see :meth:`push`).
        """
        wire_dtype = self._wire_dtype(wire_dtype)
        grad_names, values = named_values(grads)
        values = self._cast_gradients(grad_names, values)
        pull = self._weights_request(names, rows, min_version=None, wire_dtype=wire_dtype)
        base = self._base_version if base_version is None else base_version

        def step_values(values: list[Any]) -> tuple[int, pb.StepResponse]:
            headers = tensor_headers(grad_names, values, self._variable_shape)
            self._check_step_fits(headers, pull)
            # The payloads are written into the request once (InlineTensor messages handed
            # to the constructor would be copied once more); a resend changes only its push
            # header.
            request = pb.StepRequest(pull=pull)
            for v in values:
                request.gradients.add().data = whole_payload(v)

            def send(seq: int) -> pb.StepResponse:
                request.push.CopyFrom(self._push_header(seq, base, headers, wire_dtype))
                return self._call("Step", self._stub.Step, request, timeout_s)

            return self._sequenced(sequence, send)

        seq, response = self._compressed_push(
            grad_names,
            values,
            wire_dtype,
            step_values,
            lambda r: r[1].push.applied or r[1].push.duplicate,
        )
        weights = receive_inline(response.weights, version=response.version)
        if wire_dtype is not None:
            weights = self._widened(weights)
        weights.push_result = _push_result(response.push, seq)
        self._base_version = weights.version
        return weights

    def _check_step_fits(self, headers: list[tpb.TensorHeader], pull: pb.PullRequest) -> None:
        """ValueError unless a Step's request and reply each fit in one message."""
        sent = step_request_bytes(headers)
        description = self._description or self.describe()
        rows = {r.name: len(r.rows) for r in pull.rows}
        wanted = list(dict.fromkeys([*pull.names, *rows])) or description.variable_names
        specs = [(n, s) for n in wanted if (s := description.spec(n)) is not None]
        # (An unknown name is left out: the server answers NOT_FOUND.)
        returned = step_reply_bytes(
            (
                (n, payload_bytes(s.numpy_dtype.itemsize, s.shape, rows.get(n)), len(s.shape))
                for n, s in specs
            ),
            overhead=STEP_CLIENT_OVERHEAD_BYTES,
        )
        limit = self.max_message_bytes
        if max(sent, returned) > limit:
            raise ValueError(
                f"This step does not fit one message: about {sent} bytes to send and "
                f"{returned} to receive, over max_message_bytes={limit}. Use push() and "
                "pull() (streamed in chunks) for a model this large."
            )

    def pull(
        self,
        names: Sequence[str] | None = None,
        *,
        rows: Mapping[str, Sequence[int] | np.ndarray] | None = None,
        min_version: int | None = None,
        out: Mapping[str, np.ndarray] | None = None,
        timeout_s: float | None = None,
        wire_dtype: str | None = CLIENT_SETTING,
        streams: int | str = CLIENT_SETTING,
    ) -> Tensors:
        """Weights by name (all, or ``names``) at one version, as fresh writable arrays.

        ``rows`` selects rows of rank >= 1 variables; those come back as ``SparseRows``
        (``indices``, ``values``). Without ``names``, only the variables in ``rows`` are
        pulled. ``min_version`` waits, within the deadline, until the model reaches it.
        The result's ``.version`` becomes :attr:`base_version`.

        ``out`` maps names to arrays to receive those weights into, in place (writable,
        C-contiguous, the variable's dtype and shape; ValueError otherwise): no array is
        allocated and no copy made for them, and the result holds these same arrays. If
        the call fails midway, they may be partly overwritten.

        ``wire_dtype`` ("bfloat16", "float16", or None for exact; default: the client's):
        float32 weights travel rounded to it and come back as float32 arrays holding the
        rounded values (into ``out`` through one temporary array each).

        ``streams``: how many concurrent streams a large pull may be striped over (see
        :class:`Client`'s ``pull_streams``; default: the client's).
        """
        wire_dtype = self._wire_dtype(wire_dtype)
        k = self.pull_streams if streams is CLIENT_SETTING else check_pull_streams(streams)
        out = self._checked_out(out)
        if out and rows and not out.keys().isdisjoint(rows):
            raise ValueError("out= takes whole variables; it cannot receive selected rows")
        request = self._weights_request(names, rows, min_version=min_version, wire_dtype=wire_dtype)
        direct = out if wire_dtype is None else {}
        widened = {} if wire_dtype is None else self._widened_on_arrival(out)
        key = request.SerializeToString()
        size = self._pull_sizes.get(key)
        k = self._stripes_for(k, size)
        tensors = None
        if k > 1:
            try:
                tensors = self._striped_pull(request, k, direct, widened, timeout_s)
            except StripesUnusable as exc:
                if exc.unsupported:
                    self._server_stripes = False
        if tensors is None:
            tensors = self._receive_stream(
                "Pull",
                self._pull,
                request,
                lambda items: receive_tensors(
                    items, out=direct, layouts=self._reply_layouts, widen_into=widened
                ),
                timeout_s,
            )
        if size is None and len(self._pull_sizes) >= _PULL_SIZES_MAX:
            self._pull_sizes.clear()
        self._pull_sizes[key] = self._reply_layouts.last_total  # (the model may change)
        if wire_dtype is not None and not (
            widened
            and len(tensors) == len(widened)
            and all(tensors.get(n) is a for n, a in widened.items())
        ):  # (nothing left to widen when every weight was widened on arrival)
            tensors = self._widened(tensors, out)
        self._base_version = tensors.version
        return tensors

    def _stripes_for(self, k: int | str, size: int | None) -> int:
        """How many stripes a pull of ``size`` payload bytes (None: not known yet) is cut
        into with the setting ``k`` (a number or "auto")."""
        if size is None or not self._server_stripes:
            return 1
        if k == "auto":
            k = auto_pull_streams(size, _cpus())
        assert isinstance(k, int)
        k = min(k, size // self.chunk_bytes)  # a chunk or more per stripe
        return k if k > 1 else 1

    def _striped_pull(
        self,
        request: pb.PullRequest,
        k: int,
        direct: Mapping[str, np.ndarray],
        widened: Mapping[str, np.ndarray],
        timeout_s: float | None,
    ) -> Tensors:
        """One pull as ``k`` stripes on concurrent calls (see :func:`receive_stripes`),
        resent whole like any pull; StripesUnusable when they cannot make one result."""
        stubs, pool = self._stripe_stubs(k)
        stripes = []
        for i in range(k):
            stripe = pb.PullRequest()
            stripe.CopyFrom(request)
            stripe.stripe, stripe.stripes = i, k
            stripes.append(stripe)

        def attempt(left: float) -> Tensors:
            calls: list[Any] = []
            try:
                for stub, stripe in zip(stubs, stripes, strict=True):
                    calls.append(stub(stripe, **self._options(left)))
                return receive_stripes(
                    calls,
                    out=direct,
                    layouts=self._reply_layouts,
                    widen_into=widened,
                    run=lambda task: pool.submit(task),
                )
            finally:
                for call in calls:
                    call.cancel()

        return self._run("Pull", attempt, timeout_s)

    def _stripe_stubs(self, k: int) -> tuple[list[Callable[..., Any]], ThreadPoolExecutor]:
        """The Pull stub of each of ``k`` stripes (the first on the client's channel), and
        threads enough to receive them."""
        with self._lock:
            while len(self._stripe_pulls) < k - 1:
                channel = self._channel
                if self._own_stripe_channels:
                    address, settings, credentials = self._channel_args
                    channel = open_channel(
                        address, settings, credentials=credentials, own_connection=True
                    )
                    self._stripe_channels.append(channel)
                self._stripe_pulls.append(
                    channel.unary_stream(
                        method_path("Pull"),
                        request_serializer=pb.PullRequest.SerializeToString,
                        response_deserializer=decode_stream_item,
                    )
                )
            pool = self._stripe_pool
            if pool is None or self._stripe_workers < k - 1:
                if pool is not None:
                    pool.shutdown(wait=False)  # (its threads finish what they hold)
                pool = self._stripe_pool = ThreadPoolExecutor(
                    max_workers=k - 1, thread_name_prefix="paramserve-stripe"
                )
                self._stripe_workers = k - 1
            return [self._pull, *self._stripe_pulls[: k - 1]], pool

    def _weights_request(
        self,
        names: Sequence[str] | None,
        rows: Mapping[str, Sequence[int] | np.ndarray] | None,
        *,
        min_version: int | None,
        wire_dtype: str | None = None,
    ) -> pb.PullRequest:
        if isinstance(names, str):
            raise TypeError(
                f"names is a list of variable names; received the string {names!r} "
                f"(pass [{names!r}])"
            )
        if names is None and rows:
            names = list(rows)
        selections = [
            pb.RowSelection(name=n, rows=np.asarray(r, dtype=np.int64).reshape(-1).tolist())
            for n, r in (rows or {}).items()
        ]
        return pb.PullRequest(
            names=list(names or ()),
            rows=selections,
            min_version=min_version or 0,
            scope=pb.PULL_SCOPE_WEIGHTS,
            worker_id=self.worker_id,
            wire_dtype=wire_dtype_code(wire_dtype),
            packed_chunks=True,
            merged_items=True,
        )

    # --- optimizer --------------------------------------------------------------------------
    def set_hyperparameters(self, **values: float) -> dict[str, float]:
        """Change numeric hyperparameters live (e.g. ``learning_rate=1e-4``); returns all."""
        request = pb.SetHyperparametersRequest(values={k: float(v) for k, v in values.items()})
        response = self._call("SetHyperparameters", self._stub.SetHyperparameters, request, None)
        self._description = None
        return dict(response.hyperparameters)

    def optimizer_state(self, *, timeout_s: float | None = None) -> Tensors:
        """The server-side optimizer variables in optim_core (Keras 3) order, by name."""
        request = pb.PullRequest(
            scope=pb.PULL_SCOPE_OPTIMIZER_STATE, worker_id=self.worker_id, packed_chunks=True
        )
        return self._receive_stream("Pull", self._pull, request, receive_tensors, timeout_s)

    def set_optimizer_state(
        self, state: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> int:
        """Replace every optimizer variable (names as :meth:`optimizer_state` gives them);
        validated completely before anything changes. Returns the model version."""
        names, values = named_values(state)
        header = tpb.TensorStreamHeader(tensors=tensor_headers(names, values))
        first = tpb.TensorStreamItem(header=header).SerializeToString()
        response = self._send_stream(
            "SetOptimizerState",
            self._set_optimizer_state,
            lambda: request_stream(first, values, chunk_bytes=self.chunk_bytes),
            timeout_s,
        )
        return response.version

    # --- status and snapshots -----------------------------------------------------------
    def status(self, *, timeout_s: float | None = None) -> ServerStatus:
        """Version, round counters, workers (with their last sequence), mode, device."""
        response = self._call("GetStatus", self._stub.GetStatus, pb.GetStatusRequest(), timeout_s)
        return ServerStatus.from_proto(response)

    def snapshot(self, *, timeout_s: float | None = None) -> SnapshotInfo:
        """Take a consistent snapshot on the server's disk."""
        request = pb.CreateSnapshotRequest()
        response = self._call("CreateSnapshot", self._stub.CreateSnapshot, request, timeout_s)
        return SnapshotInfo.from_proto(response)

    def _snapshot_part(
        self, cut: pb.SnapshotCut, at_version: int, *, timeout_s: float | None
    ) -> SnapshotInfo:
        """This shard's part of a sharded snapshot, taken at ``at_version``."""
        request = pb.CreateSnapshotRequest(cut=cut, at_version=at_version)
        response = self._call("CreateSnapshot", self._stub.CreateSnapshot, request, timeout_s)
        return SnapshotInfo.from_proto(response)

    def _hold_updates(self, hold_s: float, *, timeout_s: float | None) -> int:
        """Have this shard apply no update for ``hold_s`` seconds (0 releases); its version."""
        request = pb.HoldUpdatesRequest(hold_s=hold_s)
        return self._call("HoldUpdates", self._stub.HoldUpdates, request, timeout_s).version

    def _validate_snapshot(self, snapshot_id: str, *, timeout_s: float | None) -> SnapshotInfo:
        """Load and check a snapshot on the server completely, changing nothing."""
        request = pb.RestoreSnapshotRequest(id=snapshot_id, validate_only=True)
        response = self._call("RestoreSnapshot", self._stub.RestoreSnapshot, request, timeout_s)
        return SnapshotInfo.from_proto(response.snapshot)

    def list_snapshots(self, *, timeout_s: float | None = None) -> list[SnapshotInfo]:
        """Snapshots on the server's disk, oldest first."""
        request = pb.ListSnapshotsRequest()
        response = self._call("ListSnapshots", self._stub.ListSnapshots, request, timeout_s)
        return [SnapshotInfo.from_proto(s) for s in response.snapshots]

    def restore(
        self, snapshot: str | SnapshotInfo, *, timeout_s: float | None = None
    ) -> SnapshotInfo:
        """Validate a snapshot (its id, or the :class:`SnapshotInfo` that :meth:`snapshot`
        or :meth:`list_snapshots` returned) completely, then replace the live state with it.
        Returns the restored snapshot's info; its ``version`` is the model's version now."""
        request = pb.RestoreSnapshotRequest(id=_snapshot_id(snapshot))
        response = self._call("RestoreSnapshot", self._stub.RestoreSnapshot, request, timeout_s)
        self._description = None
        self.error_feedback.reset()
        return SnapshotInfo.from_proto(response.snapshot)

    def download_snapshot(
        self,
        snapshot: str | SnapshotInfo,
        path: str | os.PathLike[str],
        *,
        progress: bool | None = None,
        timeout_s: float | None = None,
    ) -> Path:
        """Save a snapshot (id or :class:`SnapshotInfo`) to ``path`` (atomically); returns
        the path.

        ``progress``: a tqdm bar on stderr; None shows it for > 32 MiB on a terminal.
        """
        path = Path(path)
        snapshot_id = _snapshot_id(snapshot)
        request = pb.DownloadSnapshotRequest(id=snapshot_id)
        self._receive_stream(
            "DownloadSnapshot",
            self._stub.DownloadSnapshot,
            request,
            lambda chunks: write_download(
                chunks, path, description=f"download {snapshot_id}", progress=progress
            ),
            timeout_s,
        )
        return path

    def upload_snapshot(
        self,
        path: str | os.PathLike[str],
        *,
        restore: bool = False,
        progress: bool | None = None,
        timeout_s: float | None = None,
    ) -> SnapshotInfo:
        """Store a snapshot file on the server (validated there), and restore it if asked.

        ``path`` may also be a sharded snapshot directory (see
        :meth:`ShardedClient.download_snapshot`): the server then re-shards it for a job of one
        (the whole model, a new cut at the same version).
        """
        path = Path(path)
        if not path.is_dir():
            return self._upload([path], restore=restore, progress=progress, timeout_s=timeout_s)
        from .sharded import read_sharded_manifest, reshard_cut_id  # (sharded imports this)

        return self._upload_resharded(
            path,
            read_sharded_manifest(path),
            shards=1,
            shard_index=0,
            cut_id=reshard_cut_id(),
            restore=restore,
            progress=progress,
            timeout_s=timeout_s,
        )

    def _upload_resharded(
        self,
        directory: Path,
        manifest: Mapping[str, Any],
        *,
        shards: int,
        shard_index: int,
        cut_id: str,
        restore: bool,
        progress: bool | None,
        timeout_s: float | None,
        split_threshold_bytes: int | None = None,
    ) -> SnapshotInfo:
        """Send the sharded snapshot ``directory`` (``manifest``: its checked manifest) whole,
        for this server to keep its part as shard ``shard_index`` of ``shards`` in the cut
        ``cut_id``."""
        files = sorted(manifest["files"], key=lambda f: f["shard"])
        return self._upload(
            [directory / f["file"] for f in files],
            restore=restore,
            progress=progress,
            timeout_s=timeout_s,
            reshard=pb.ReshardUpload(
                manifest=(directory / "manifest.json").read_bytes(),
                shards=shards,
                shard_index=shard_index,
                cut_id=cut_id,
                split_threshold_bytes=split_threshold_bytes or 0,
            ),
        )

    def _upload(
        self,
        paths: list[Path],
        *,
        restore: bool,
        progress: bool | None,
        timeout_s: float | None,
        reshard: pb.ReshardUpload | None = None,
    ) -> SnapshotInfo:
        """UploadSnapshot of ``paths`` end to end (one file, or with ``reshard`` a whole
        sharded snapshot for the server to re-place)."""
        total = sum(p.stat().st_size for p in paths)
        label = paths[0].name if len(paths) == 1 else f"{paths[0].parent.name} ({len(paths)} files)"
        with progress_bar(total, f"upload {label}", progress) as bar:

            def requests() -> Iterator[pb.UploadSnapshotRequest]:
                # Each attempt reads the files anew (one that could not connect is tried
                # again: see wait_for_server_s); the bar starts over with it.
                bar.reset()
                return upload_requests(
                    paths,
                    restore=restore,
                    chunk_bytes=self.chunk_bytes,
                    bar=bar,
                    reshard=reshard,
                )

            response = self._send_stream(
                "UploadSnapshot", self._stub.UploadSnapshot, requests, timeout_s
            )
        if restore:
            self._description = None
            self.error_feedback.reset()
        return SnapshotInfo.from_proto(response.snapshot)
