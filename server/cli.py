"""The ``paramserve`` command: ``serve`` runs the daemon; ``status``, ``snapshot``, ``snapshots``,
``restore`` administer one through the client SDK; ``demo`` runs the end-to-end demo and
``worker`` one demo worker against a running server.

Flags of ``serve`` override the environment (``PARAMSERVE_*``), which overrides the TOML file
given by ``--config``, which overrides the defaults (see :mod:`paramserve.server.config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from paramserve.optim_core import DEVICES
from paramserve.wire import DEFAULT_ADDRESS

from .aggregation import DEADLINE_POLICIES, MODES, REDUCTIONS
from .config import (
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    ServerConfig,
    load_config,
    parse_bytes,
)
from .errors import StartupRefused
from .gradients import NONFINITE_POLICIES

logger = logging.getLogger(__name__)


# Attributes every LogRecord has; anything else on a record came from ``extra={...}``.
_STANDARD_RECORD = logging.LogRecord("", 0, "", 0, "", (), None)
_RECORD_ATTRIBUTES = frozenset(_STANDARD_RECORD.__dict__) | {"message", "asctime", "taskName"}


def log_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a log call passed with ``extra={...}`` (event, snapshot_id, ...)."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ``extra`` fields
    (``event``, ``snapshot_id``, ``version``, ...) and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        for key, value in log_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextLogFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` on one line (tracebacks escaped)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None  # the traceback goes in as one field
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text = saved
        fields = log_fields(record)
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        for key, value in fields.items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if not text or any(c.isspace() or c in '"=' for c in text):
                text = json.dumps(text)
            line += f" {key}={text}"
        return line.replace("\n", "\\n")


def configure_logging(*, level: str = "info", log_format: str = "text") -> None:
    """Log to stderr, one event per line as text or JSON; replaces handlers installed earlier.

    Python warnings are logged too, so nothing else writes free-form lines to stderr.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    # No abbreviations: `--token SECRET` must not pass for `--tokens-file`.
    p = sub.add_parser(
        "serve", help="run the parameter server until SIGTERM/SIGINT", allow_abbrev=False
    )
    p.add_argument("--config", metavar="TOML", help="TOML file (also $PARAMSERVE_CONFIG)")
    net = p.add_argument_group("network")
    net.add_argument("--host", help="address to listen on (default 127.0.0.1, loopback only)")
    net.add_argument("--port", type=int, help="port to listen on; 0 picks one (default 50051)")
    net.add_argument("--metrics-port", type=int, help="Prometheus /metrics port; 0 = off")
    net.add_argument("--grace-s", type=float, help="seconds in-flight calls get at shutdown")
    net.add_argument("--max-workers", type=int, help="RPC threads (sync rounds hold one each)")
    sec = p.add_argument_group(
        "security (tokens: --tokens-file or $PARAMSERVE_ADMIN_TOKEN/$PARAMSERVE_WORKER_TOKEN)"
    )
    sec.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain")
    sec.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    sec.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="require client certificates (mTLS)"
    )
    sec.add_argument(
        "--tokens-file", type=Path, metavar="FILE", help="TOML/JSON {admin=[..], worker=[..]}"
    )
    train = p.add_argument_group("training")
    train.add_argument("--optimizer", help="default optimizer: a name or Keras JSON config")
    train.add_argument("--device", choices=DEVICES)
    train.add_argument("--mode", choices=MODES, help="aggregation mode")
    train.add_argument("--replicas", type=int, help="workers per synchronous round")
    train.add_argument("--reduction", choices=REDUCTIONS)
    train.add_argument(
        "--round-timeout-s",
        "--round-deadline-s",
        dest="round_timeout_s",
        type=float,
        help="seconds a round (or a stale-mode wait) may take",
    )
    train.add_argument("--deadline-policy", choices=DEADLINE_POLICIES)
    train.add_argument("--max-staleness", type=int, help="stale mode: pushes ahead of slowest")
    train.add_argument("--nonfinite", choices=NONFINITE_POLICIES, help="NaN/Inf gradients")
    snap = p.add_argument_group("snapshots")
    snap.add_argument("--checkpoint-dir", type=Path, help="enables snapshots, stored here")
    snap.add_argument("--snapshot-every-s", type=float, help="periodic snapshots; 0 = off")
    snap.add_argument("--keep-snapshots", type=int, help="keep only the newest N")
    snap.add_argument(
        "--snapshot-on-exit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="final snapshot at shutdown (default on)",
    )
    snap.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="restore the newest valid snapshot at start",
    )
    snap.add_argument(
        "--push-log",
        type=Path,
        metavar="PATH",
        help="append a JSON line per applied push, in apply order (audit, replay)",
    )
    lim = p.add_argument_group("limits (byte sizes accept 64MiB, 8GiB, ...)")
    for name in ("max_message_bytes", "max_tensor_bytes", "max_request_bytes", "max_state_bytes"):
        lim.add_argument("--" + name.replace("_", "-"), type=_bytes_arg, metavar="BYTES")
    lim.add_argument("--max-variables", type=int)
    lim.add_argument("--max-concurrent-streams", type=int)
    _add_logging_flags(p)


def _add_logging_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument("--log-format", choices=LOG_FORMATS)


def _add_admin_parser(
    sub: argparse._SubParsersAction, name: str, help_text: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument(
        "--address",
        default=os.environ.get("PARAMSERVE_ADDRESS", DEFAULT_ADDRESS),
        help=f"server host:port (default $PARAMSERVE_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument("--timeout-s", type=float, default=60.0, help="deadline of the call")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signed the server's cert")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="client key (mTLS)")
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding an admin token (default: $PARAMSERVE_TOKEN)",
    )
    _add_logging_flags(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paramserve", description="paramserve: a parameter server for ML training"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(sub)
    _add_admin_parser(sub, "status", "print a server's status as JSON")
    _add_admin_parser(sub, "snapshot", "take a snapshot on the server's disk")
    _add_admin_parser(sub, "snapshots", "list the server's snapshots")
    restore = _add_admin_parser(sub, "restore", "validate and restore a snapshot")
    restore.add_argument("snapshot_id", metavar="ID")
    # Listed for --help only: main() hands `demo ...` to the demo's own parser.
    sub.add_parser("demo", help="run the end-to-end demo (see `paramserve demo --help`)")
    sub.add_parser("worker", help="run one demo worker against a server (see --help)")
    return parser


_SERVE_NON_CONFIG = {"command", "config"}


def _jsonable(value: Any) -> Any:
    """Best-effort conversion of SDK results (dataclasses, protobuf messages) for printing."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "DESCRIPTOR") and hasattr(value, "ListFields"):
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    return str(value)


def config_from_args(
    args: argparse.Namespace, *, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """The ServerConfig of a parsed ``serve`` command line (flags over env over TOML)."""
    overrides = {k: v for k, v in vars(args).items() if k not in _SERVE_NON_CONFIG}
    return load_config(config_file=args.config, env=env, overrides=overrides)


def _run_serve(args: argparse.Namespace) -> int:
    from .app import serve

    config = config_from_args(args)
    configure_logging(level=config.log_level, log_format=config.log_format)
    return serve(config)


def _run_admin(args: argparse.Namespace) -> int:
    from paramserve.client import Client

    configure_logging(level=args.log_level or "warning", log_format=args.log_format or "text")
    token = None
    if args.token_file is not None:
        from .auth import read_secret_file

        token = read_secret_file(args.token_file).strip()
    with Client(
        args.address,
        timeout_s=args.timeout_s,
        wait_for_ready=False,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=token,
    ) as client:
        if args.command == "status":
            result = client.status()
        elif args.command == "snapshot":
            result = client.snapshot()
        elif args.command == "snapshots":
            result = client.list_snapshots()
        else:
            result = client.restore(args.snapshot_id)
    print(json.dumps(_jsonable(result), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paramserve`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        # The demo parses its own flags; argparse's REMAINDER would refuse leading --flags.
        from .demo import main as demo_main

        return int(demo_main(argv[1:]) or 0)
    if argv[:1] == ["worker"]:
        from .demo import worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _run_serve(args)
        return _run_admin(args)
    except ConfigError as exc:
        print(f"paramserve: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.command != "serve" and hasattr(exc, "code"):
            # SDK errors carry the gRPC code and the server's message: no traceback.
            print(f"paramserve {args.command}: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, (OSError, StartupRefused)):  # the port or directory is taken
            print(f"paramserve {args.command}: {exc}", file=sys.stderr)
            return 1
        raise
