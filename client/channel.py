"""The SDK's gRPC channel: message limits, keepalive, reconnects; gRPC's own retries off.

gRPC's retries are off (``grpc.enable_retries`` 0: no retry policy, no transparent retries,
no per-call retry buffer). The SDK resends calls itself instead, with one loop for every
method that is safe to repeat (:mod:`paramserve.client.resend`): it builds each attempt's
request anew from the caller's arrays, so a push of any size is resent whole, with the same
``(worker_id, sequence, session)``, and nothing holds a copy of it.

Why not gRPC's retries: with them on, gRPC (grpcio 1.85.3, its retry filter) replays a
client-streaming call (Push, CreateModel, ...) on a new attempt after the connection is lost,
and ``GRPC_TRACE=retry`` runs through a lossy TCP proxy (``tests/faults/lossy_proxy.py``,
``tests/faults/lossy_soak.py``) showed two faults of that replay, neither of them with
retries off:

- a push that outgrows the retry buffer while the retry waits out its backoff is committed
  between attempts; the next attempt then starts that new message at once and, when its
  headers are sent, also replays the buffered ones: two send operations in flight on one
  call, and the process aborts (``promise_based_filter.cc:452] ILLEGAL STATE:
  FORWARDED_BATCH``, SIGABRT), in 9 of 10 worker runs of 4 MiB pushes;
- a push that fits the buffer loses the message the caller hands over while the replay is
  under way: the attempt half-closes without it, and the server refuses the truncated
  stream (INVALID_ARGUMENT, "ended without its end item" or "tensor ... ended early").

Without a retry policy (transparent retries only) 7 runs showed neither fault, but
transparent retries are made by the same filter, so the channel turns retries off
altogether: with ``grpc.enable_retries`` 0 the filter is not in the channel at all (its
``GRPC_TRACE=retry`` log, one line per call and attempt otherwise, stays empty).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc.experimental import ChannelOptions

from paramserve.wire import SERVICE_NAME


def method_path(method: str) -> str:
    """``/paramserve.v1.ParameterServer/<method>``, the name gRPC routes on."""
    return f"/{SERVICE_NAME}/{method}"


@dataclass(frozen=True)
class ChannelSettings:
    """Transport options of a :class:`~paramserve.client.Client`."""

    max_message_bytes: int = 64 << 20
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 20.0
    # Reconnect soon after a server restarts (gRPC's default waits 1 s, then longer).
    initial_reconnect_backoff_s: float = 0.2
    max_reconnect_backoff_s: float = 5.0
    user_agent: str = "paramserve-client"

    def options(self) -> list[tuple[str, int | str]]:
        """Channel arguments (see grpc_types.h for their meaning)."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Pings detect a dead server during long waits (sync rounds, min_version
            # pulls). gRPC sends at most two pings without data in between, which stays
            # within a default server's ping-abuse policy.
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            # The SDK resends calls itself (see the module docstring): no retry filter.
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", int(self.initial_reconnect_backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.max_reconnect_backoff_s * 1000)),
            ("grpc.primary_user_agent", self.user_agent),
            (ChannelOptions.SingleThreadedUnaryStream, 1),
        ]


def open_channel(
    address: str,
    settings: ChannelSettings,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    own_connection: bool = False,
) -> grpc.Channel:
    """An insecure channel, or a TLS one when ``credentials`` are given. ``own_connection``:
    its own TCP connection, never shared with another channel to the same address (gRPC
    shares one between channels of equal settings by default)."""
    options = settings.options()
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def tls_credentials(
    *,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    ``ca`` verifies the server's certificate (None: the system's trusted roots); ``cert`` and
    ``key``, given together, are this client's certificate for mutual TLS.
    """
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key must be given together (mutual TLS)")

    def read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise OSError(f"cannot read the {what} {str(path)!r}: {exc.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "CA certificate (tls_ca)"),
        private_key=read(key, "client key (tls_key)"),
        certificate_chain=read(cert, "client certificate (tls_cert)"),
    )
