"""The SDK's gRPC channel: message limits, keepalive, and retries through the service config.

Retries are gRPC's own (``grpc.enable_retries`` plus a ``retryPolicy`` in the service
config), never a hand-written loop: gRPC replays the buffered request on a fresh
transport when a call fails with UNAVAILABLE (or is cancelled by a server that is shutting
down) before the server answered. Only calls that
are safe to repeat are listed. Push is among them because the server deduplicates by
``(worker_id, sequence)``; a retried push whose first attempt took effect is acknowledged
as a duplicate, not applied twice.

gRPC can only replay what it still holds: a call is retried while everything it sent fits
in the per-call retry buffer (``retry_buffer_bytes``, default :data:`RETRY_BUFFER_BYTES`:
a header plus one 2 MiB chunk, so small pushes and every Step RemoteOptimizer sends). A
larger push is committed to its first attempt once it outgrows the buffer, and gRPC lets
each chunk go as soon as it is sent instead of keeping the whole push in memory (at 16M
floats that held 64 MiB per push and cost the worker ~13 ms of CPU per step). Such a push
is not retried automatically: if it fails with
:class:`~paramserve.client.UnavailableError`, re-send it with the same sequence
(``client.push(grads, sequence=client.last_sequence)``); the server applies it at most
once and acknowledges a repeat as a duplicate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from paramserve.v1 import parameter_server_pb2 as pb

from .tensors import CHUNK_BYTES

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name

# Calls whose repetition cannot change the outcome (Push and Step: deduplicated server-side;
# a repeated Step answers with the current weights).
RETRYABLE_METHODS = (
    "Describe",
    "Pull",
    "GetStatus",
    "ListSnapshots",
    "DownloadSnapshot",
    "Push",
    "Step",
)


# What gRPC may hold of one call's request for replaying it (see the module docstring).
RETRY_BUFFER_BYTES = CHUNK_BYTES + (64 << 10)


def method_path(method: str) -> str:
    """``/paramserve.v1.ParameterServer/<method>``, the name gRPC routes on."""
    return f"/{SERVICE}/{method}"


@dataclass(frozen=True)
class ChannelSettings:
    """Transport options of a :class:`~paramserve.client.Client`."""

    max_message_bytes: int = 64 << 20
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 20.0
    retry_max_attempts: int = 5
    retry_initial_backoff_s: float = 0.2
    retry_max_backoff_s: float = 5.0
    retry_buffer_bytes: int = RETRY_BUFFER_BYTES
    # Reconnect soon after a server restarts (gRPC's default waits 1 s, then longer).
    initial_reconnect_backoff_s: float = 0.2
    max_reconnect_backoff_s: float = 5.0
    user_agent: str = "paramserve-client"

    def service_config(self) -> str:
        """The JSON service config: a retry policy on UNAVAILABLE for the idempotent calls."""
        policy = {
            "maxAttempts": self.retry_max_attempts,
            "initialBackoff": f"{self.retry_initial_backoff_s}s",
            "maxBackoff": f"{self.retry_max_backoff_s}s",
            "backoffMultiplier": 2,
            # CANCELLED: a server that is shutting down cancels calls arriving at that
            # moment; calls this client cancels itself are never retried by gRPC.
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        }
        names = [{"service": SERVICE, "method": m} for m in RETRYABLE_METHODS]
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})

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
            ("grpc.enable_retries", 1),
            ("grpc.service_config", self.service_config()),
            ("grpc.per_rpc_retry_buffer_size", self.retry_buffer_bytes),
            ("grpc.initial_reconnect_backoff_ms", int(self.initial_reconnect_backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.max_reconnect_backoff_s * 1000)),
            ("grpc.primary_user_agent", self.user_agent),
        ]


def open_channel(
    address: str,
    settings: ChannelSettings,
    *,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.Channel:
    """An insecure channel, or a TLS one when ``credentials`` are given."""
    if credentials is None:
        return grpc.insecure_channel(address, options=settings.options())
    return grpc.secure_channel(address, credentials, options=settings.options())


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
