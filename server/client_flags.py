"""Command-line flags that connect a client to a server: TLS certificates and a bearer token.

:func:`add_tls_token_flags` adds ``--tls-ca/--tls-cert/--tls-key/--token-file`` to a parser and
:func:`client_security` turns the parsed flags into ``Client`` keyword arguments. The token
comes from ``--token-file`` (a file other users cannot read), else from ``$PARAMSERVE_TOKEN``
(the ``Client`` default); it never comes from a flag, so it does not show in ``ps``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .auth import SecurityConfigError, check_token, read_secret_file


def add_tls_token_flags(parser: argparse.ArgumentParser, *, token_role: str) -> None:
    """Add the TLS and token flags; ``token_role`` names the token the command needs."""
    group = parser.add_argument_group(
        "security (the server's --tls-cert/--tls-client-ca/--tokens-file)"
    )
    group.add_argument(
        "--tls-ca",
        type=Path,
        metavar="PEM",
        help="CA that signed the server's certificate (turns on TLS)",
    )
    group.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)"
    )
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="client key (mutual TLS)")
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"file holding {token_role} token, readable only by you "
        "(default: $PARAMSERVE_TOKEN; none: no token is sent)",
    )


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """``Client`` keyword arguments (``tls_ca``, ``tls_cert``, ``tls_key``, ``token``) from
    flags added by :func:`add_tls_token_flags`.

    Raises :class:`~paramserve.server.auth.SecurityConfigError` for a client certificate
    without its key (or the reverse) and for a token file that is unreadable, readable by
    other users or holds no usable token. ``token`` is None without ``--token-file``: the
    ``Client`` then takes ``$PARAMSERVE_TOKEN``.
    """
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together (mutual TLS)")
    token = None
    if args.token_file is not None:
        source = f"token file {str(args.token_file)!r}"
        token = check_token(read_secret_file(args.token_file).strip(), source)
    return {
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "token": token,
    }


def job_address(text: str) -> str | list[str]:
    """``--address`` as ``Client`` takes it: ``host:port``, or a comma-separated list of
    every shard's ``host:port`` in shard order (one sharded job)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) == 1:
        return parts[0]
    if not all(parts):
        raise argparse.ArgumentTypeError(
            f"--address {text!r}: every shard's host:port, separated by commas, shard 0 first"
        )
    return parts
