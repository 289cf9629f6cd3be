"""Health probe for containers and systemd: exit 0 when a paramserve server is SERVING, else 1.

``python -m paramserve.server.healthcheck [--address HOST:PORT] [--timeout-s 2]`` asks the
standard gRPC health service (``grpc.health.v1.Health/Check``) once, prints the status on one
line and exits 0 only for SERVING: NOT_SERVING (the server is draining after SIGTERM), an
unknown service, a refused connection or a timeout all exit 1. Without TLS flags it imports
nothing but gRPC, so it is cheap enough to run every few seconds. The health service needs no
token; a TLS server needs ``--tls-ca`` (and ``--tls-cert``/``--tls-key`` under mutual TLS).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def default_address() -> str:
    """``$PARAMSERVE_ADDRESS``, else the local server's port (``$PARAMSERVE_PORT`` or 50051)."""
    address = os.environ.get("PARAMSERVE_ADDRESS")
    if address:
        return address
    return f"127.0.0.1:{os.environ.get('PARAMSERVE_PORT') or 50051}"


def _open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    server_name: str | None,
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str,
    *,
    service: str = "",
    timeout_s: float = 2.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> str:
    """The health status name of ``service`` at ``address`` (``SERVING``, ``NOT_SERVING``, ...);
    a failed call gives its status code name (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ...).

    ``credentials`` turn on TLS; ``server_name`` is the name to verify the certificate against
    when it differs from ``address`` (e.g. probing 127.0.0.1 inside the container).
    """
    with _open_channel(address, credentials, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m paramserve.server.healthcheck",
        description="Exit 0 when the paramserve server at --address is SERVING, 1 otherwise.",
    )
    p.add_argument(
        "--address",
        default=None,
        help="server host:port (default $PARAMSERVE_ADDRESS, else 127.0.0.1:$PARAMSERVE_PORT "
        "or 127.0.0.1:50051)",
    )
    p.add_argument("--timeout-s", type=float, default=2.0, help="deadline of the check")
    p.add_argument(
        "--service",
        default="",
        help="service to ask about (default: the whole server; paramserve.v1.ParameterServer)",
    )
    tls = p.add_argument_group("TLS (as `paramserve status`)")
    tls.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signed the server's cert")
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mTLS)")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="client key (mTLS)")
    tls.add_argument(
        "--tls-server-name", metavar="NAME", help="name in the server certificate, if not the host"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.timeout_s > 0:
        print("healthcheck: --timeout-s must be > 0", file=sys.stderr)
        return 2
    address = args.address or default_address()
    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        from paramserve.client.channel import tls_credentials  # only now: it imports the SDK

        try:
            credentials = tls_credentials(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
        except (OSError, ValueError) as exc:
            print(f"healthcheck: {exc}", file=sys.stderr)
            return 2
    status = check(
        address,
        service=args.service,
        timeout_s=args.timeout_s,
        credentials=credentials,
        server_name=args.tls_server_name,
    )
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
