"""Assembling and running the daemon: gRPC server, health, reflection, metrics, snapshots, signals.

:func:`create_server` builds the core (:func:`~paramserve.server.core.build_core`) with its
metrics, puts the servicer, health and reflection on a gRPC server, starts everything and
returns a :class:`RunningServer` (tests bind port 0 and read ``.port``); :func:`serve` runs
one until SIGTERM or SIGINT, then shuts down in order: health NOT_SERVING, new pushes refused
(UNAVAILABLE), aggregator closed, final snapshot if configured, in-flight calls given
``grace_s``, exit status 0.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from paramserve import optim_core
from paramserve.wire import SERVICE_NAME, set_cast_threads, tune_malloc

from . import auth
from .config import ServerConfig, apply_threads_for, format_address
from .core import ServerCore, build_core
from .errors import ParamServeError
from .metrics import ServerMetrics
from .reflection import enable_server_reflection
from .servicer import ParameterServerServicer, add_to_server

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments of the server: message limits, streams, keepalive tolerance."""
    limits = config.limits
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # One stream more per connection than the server-wide limit (maximum_concurrent_rpcs):
        # a call past it reaches the server and is refused (RESOURCE_EXHAUSTED) instead of
        # waiting unseen in the client until its deadline.
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams + 1),
        # Two servers must never share a port (tests start many on port 0).
        ("grpc.so_reuseport", 0),
        # Let SDK keepalive pings through (every >= 10 s, also while idle).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class _HealthServicer(health.HealthServicer):
    """gRPC's reference health service, plus ending open Watch streams at shutdown.

    An open Watch is an RPC in flight: left alone it would hold ``server.stop(grace)`` for the
    whole grace period, although its client has already been told NOT_SERVING.
    """

    def end_watches(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:  # grpc_health internals changed: the grace period still bounds it
            return
        with lock:
            watches = getattr(self, "_send_response_callbacks", {})
            callbacks = [cb for service in watches.values() for cb in service]
        for callback in callbacks:
            callback(None)  # finishes the stream with status OK


@dataclass
class RunningServer:
    """A started daemon. ``stop()`` (or ``shutdown()``) drains it; safe to call twice."""

    config: ServerConfig
    core: ServerCore
    metrics: ServerMetrics
    port: int
    metrics_port: int | None
    _server: grpc.Server
    _health: _HealthServicer
    _stop_periodic: threading.Event = field(default_factory=threading.Event)
    _periodic: threading.Thread | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        """``host:port`` a client can dial (the port actually bound)."""
        return format_address(self.config.host, self.port)

    def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse pushes, close rounds, final snapshot, stop."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        with self._stop_lock:
            if self._stopped.is_set():
                return
            started = time.monotonic()
            logger.info(
                "shutting down (grace %.1f s)",
                grace_s,
                extra={"event": "shutdown_started", "grace_s": grace_s},
            )
            # Refuse first, then announce: once a probe sees NOT_SERVING, pushes fail.
            self.core.stop_accepting()
            self.metrics.serving.set(0)
            self._health.enter_graceful_shutdown()
            self.core.close_rounds()
            self._stop_periodic.set()
            if self._periodic is not None:
                self._periodic.join()
            if self.core.snapshots is not None and self.config.snapshot_on_exit:
                self._final_snapshot()
            self.core.end_waits()  # waiting pulls end with UNAVAILABLE instead of hanging
            stopped = self._server.stop(grace_s)  # closes listeners, sends GOAWAY first
            self._health.end_watches()
            stopped.wait()
            self.metrics.stop_http()
            self.core.release_directory()  # another daemon may have the directory now
            self._stopped.set()
            seconds = time.monotonic() - started
            logger.info("stopped", extra={"event": "stopped", "shutdown_s": round(seconds, 3)})

    shutdown = stop

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` has finished; False on timeout."""
        return self._stopped.wait(timeout_s)

    def _final_snapshot(self) -> None:
        if self.core.model_version() is None:
            logger.info("no model: no final snapshot", extra={"event": "final_snapshot_skipped"})
            return
        try:
            self.core.take_snapshot(trigger="exit")
        except Exception:
            logger.exception("final snapshot failed", extra={"event": "snapshot_failed"})

    def _run_periodic(self) -> None:
        """Snapshot every ``snapshot_every_s`` when the version moved since the last one."""
        # A model at start-up came from --resume: its snapshot is on disk already.
        last_version = self.core.model_version()
        while not self._stop_periodic.wait(self.config.snapshot_every_s):
            version = self.core.model_version()
            if version is None or version == last_version:
                continue
            try:
                last_version = self.core.take_snapshot(trigger="periodic").version
            except ParamServeError as exc:
                logger.warning(
                    "periodic snapshot skipped: %s", exc, extra={"event": "snapshot_skipped"}
                )
            except Exception:
                logger.exception("periodic snapshot failed", extra={"event": "snapshot_failed"})


def address_in_use(host: str, port: int) -> bool:
    """Whether another socket holds ``host:port`` (a trial bind, as gRPC binds: SO_REUSEADDR,
    no SO_REUSEPORT); False for port 0 or when the host does not resolve."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return False
    for family, kind, proto, _name, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
    return False


def port_in_use_error(what: str, address: str, hint: str) -> OSError:
    """The OSError a daemon fails with when ``address`` is taken: what, where, and ``hint``
    (the flag that picks another port)."""
    error = OSError(
        f"cannot listen for {what} on {address}: address already in use by another process; {hint}"
    )
    error.errno = errno.EADDRINUSE
    return error


_PORT_HINT = "choose another port with --port (--port 0 picks a free one)"
_METRICS_PORT_HINT = "choose another port with --metrics-port"


def _bind(
    server: grpc.Server,
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Listen on the configured address (TLS with ``credentials``); OSError when the host does
    not resolve or the port is taken (checked first: gRPC itself only logs why a bind failed)."""
    address = config.address
    try:
        socket.getaddrinfo(config.host.strip("[]"), None, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(
            f"cannot listen on {address}: the host {config.host!r} does not resolve "
            f"({exc.strerror}); set --host to an address of this machine"
        ) from None
    if address_in_use(config.host, config.port):
        raise port_in_use_error("gRPC", address, _PORT_HINT)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        if address_in_use(config.host, config.port):  # taken since the check
            raise port_in_use_error("gRPC", address, _PORT_HINT) from None
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def _warn_if_exposed(config: ServerConfig, *, tls: bool, tokens: bool) -> None:
    """One WARNING line per missing protection when other machines can reach the port."""
    if is_loopback(config.host):
        return
    if not tls:
        logger.warning(
            "listening on %s without TLS: gradients, weights and tokens cross the network in "
            "clear text; set tls_cert and tls_key (--tls-cert/--tls-key, add --tls-client-ca "
            "for mutual TLS)",
            config.host,
            extra={"event": "insecure_no_tls"},
        )
    if not tokens:
        logger.warning(
            "listening on %s without authentication: anyone who can reach it can change or "
            "delete the model; set --tokens-file or PARAMSERVE_ADMIN_TOKEN and "
            "PARAMSERVE_WORKER_TOKEN",
            config.host,
            extra={"event": "insecure_no_auth"},
        )


def create_server(config: ServerConfig) -> RunningServer:
    """Build the core, bind, and start serving; port 0 picks a free port (see ``.port``)."""
    # Reuse freed tensor-sized buffers instead of page-faulting new ones (glibc only; the
    # MALLOC_* environment variables take precedence): see paramserve.wire.
    tune_malloc()
    # The fused optimizer kernels, and the rounding of large compressed pulls, on several
    # cores for large variables (process-wide).
    threads = apply_threads_for(config.apply_threads)
    optim_core.set_kernel_threads(threads)
    set_cast_threads(threads)
    metrics = ServerMetrics()
    core = build_core(config, metrics)
    try:
        return _start(config, core, metrics)
    except BaseException:
        core.close()
        metrics.stop_http()
        raise


def _start(config: ServerConfig, core: ServerCore, metrics: ServerMetrics) -> RunningServer:
    tokens = auth.resolve_tokens(
        tokens_file=config.tokens_file, admin=config.admin_tokens, worker=config.worker_tokens
    )
    credentials = None
    if config.tls_cert is not None and config.tls_key is not None:
        credentials = auth.server_credentials(
            cert=config.tls_cert, key=config.tls_key, client_ca=config.tls_client_ca
        )
    if config.resume:
        core.resume()
    metrics.set_model_version(core.model_version() or 0)

    servicer = ParameterServerServicer(core, metrics)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        options=grpc_options(config),
        interceptors=[auth.TokenAuthInterceptor(tokens, on_denied=servicer.count_call)]
        if tokens.enabled
        else None,
        # Calls in flight past this are refused with RESOURCE_EXHAUSTED (queued ones count).
        maximum_concurrent_rpcs=config.limits.max_concurrent_streams,
    )
    add_to_server(servicer, server)
    health_servicer = _HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME), server)  # v1 and v1alpha
    try:
        port = _bind(server, config, credentials)
        _warn_if_exposed(config, tls=credentials is not None, tokens=tokens.enabled)
        metrics_port = None
        if config.metrics_port:
            try:
                metrics_port = metrics.serve_http(host=config.host, port=config.metrics_port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                where = format_address(config.host, config.metrics_port)
                raise port_in_use_error("/metrics", where, _METRICS_PORT_HINT) from None
        server.start()
    except BaseException:
        server.stop(None)
        raise
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    metrics.serving.set(1)

    running = RunningServer(
        config=config,
        core=core,
        metrics=metrics,
        port=port,
        metrics_port=metrics_port,
        _server=server,
        _health=health_servicer,
    )
    if config.checkpoint_dir is not None and config.snapshot_every_s > 0:
        running._periodic = threading.Thread(
            target=running._run_periodic, name="periodic-snapshots", daemon=True
        )
        running._periodic.start()
    logger.info(
        "paramserve listening on %s (mode=%s, replicas=%d, device=%s, apply_threads=%d)",
        running.address,
        config.aggregation.mode,
        config.aggregation.replicas,
        core.store.device,
        optim_core.kernel_threads()[0],
        extra={
            "event": "listening",
            "address": running.address,
            "metrics_port": metrics_port,
            "version": core.model_version() or 0,
            "apply_threads": optim_core.kernel_threads()[0],
        },
    )
    return running


def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT, drain it, and return the exit status (0).

    A second SIGTERM or SIGINT during the drain exits at once with status 1 (snapshots are
    written atomically, so an interrupted final snapshot leaves the previous one valid).
    """
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop_requested.is_set():
            logger.warning(
                "received %s again: exiting now, without finishing the drain",
                name,
                extra={"event": "forced_exit", "signal": name},
            )
            logging.shutdown()
            os._exit(1)
        logger.info("received %s", name, extra={"event": "signal", "signal": name})
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = create_server(config)
        while not stop_requested.wait(0.5):
            pass
        running.stop(config.grace_s)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
