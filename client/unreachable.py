"""A server the client cannot reach: telling it apart from a lost call, and saying why.

A call that is not ``wait_for_ready`` fails at once with UNAVAILABLE when gRPC cannot connect,
and its details carry the transport's reason (grpcio 1.85, measured against real servers):

- nothing listening: ``failed to connect to all addresses; last error: UNKNOWN:
  ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused``;
- unknown host: ``errors resolving no-such-host.invalid:50051: [... Domain name not found]``;
- a plaintext client against a TLS server: ``failed to connect ...: Socket closed`` (the server
  closes the connection on the bytes that are not a TLS ClientHello); the same for a TLS client
  without the certificate a mutual-TLS server requires;
- a TLS client against a plaintext server: ``... Tls handshake failed (TSI_PROTOCOL_FAILURE):
  ... WRONG_VERSION_NUMBER ...``;
- a server certificate the client's CA did not sign: ``... Tls handshake failed ...
  CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate``.

Such a call never reached the server, so sending it again is safe for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

# Details of an UNAVAILABLE that gRPC made because no connection could be set up.
_CONNECT_FAILURES = (
    "failed to connect to all addresses",
    "errors resolving",
    "DNS resolution failed",
)


@dataclass
class Reachability:
    """What a client knows of its server: where it is, whether it speaks TLS, whether any
    call has reached it yet, and how long to wait for it before it first has."""

    address: str
    tls: bool = False
    wait_for_server_s: float = 0.0
    reached: bool = False


def is_connect_failure(code: grpc.StatusCode, details: str | None) -> bool:
    """True for an UNAVAILABLE made because no connection to the server could be set up
    (refused, unknown host, TLS handshake failed): the request was never sent."""
    return code == grpc.StatusCode.UNAVAILABLE and any(
        marker in (details or "") for marker in _CONNECT_FAILURES
    )


def connect_failure_cause(details: str, *, tls: bool) -> str:
    """The likely cause of a connect failure, in words, with what to check."""
    if "errors resolving" in details or "DNS resolution failed" in details:
        return (
            "unknown host: its name does not resolve (check the host part of the address for typos)"
        )
    if "Connection refused" in details:
        return (
            "connection refused: nothing listens on that port (is `paramserve serve` "
            "running on that machine, with that --host and --port?)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            "TLS handshake failed, certificate verify failed: the server's certificate is "
            "not signed by the CA this client trusts (tls_ca / --tls-ca must be the CA that "
            "signed the server's --tls-cert)"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return (
            "TLS handshake failed: the server does not speak TLS (it runs without "
            "--tls-cert); connect without tls_ca/tls_cert/tls_key (--tls-ca, ...), or start "
            "the server with --tls-cert and --tls-key"
        )
    if "andshake failed" in details:  # "Tls handshake failed", "Ssl handshake failed"
        return "TLS handshake failed (check tls_ca, tls_cert and tls_key against the server)"
    if "Socket closed" in details or "Connection reset" in details:
        if tls:
            return (
                "the server closed the connection during the TLS handshake: it may require "
                "a client certificate (tls_cert and tls_key, signed by its --tls-client-ca)"
            )
        return (
            "the server closed the connection during the handshake: it probably uses TLS "
            "(pass tls_ca=... / --tls-ca with the CA that signed its certificate)"
        )
    if "timed out" in details.lower() or "Timeout occurred" in details:
        return (
            "no answer: the connection timed out (the host does not answer on that port: a "
            "firewall dropping packets, or the wrong host)"
        )
    return "the connection could not be set up"


def unreachable_message(details: str, reach: Reachability) -> str:
    """``cannot reach the server at ADDRESS: CAUSE``, for an UnavailableError."""
    return (
        f"cannot reach the paramserve server at {reach.address}: "
        f"{connect_failure_cause(details, tls=reach.tls)}"
    )
