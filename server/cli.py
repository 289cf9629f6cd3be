"""The ``paramserve`` command: ``serve`` runs the daemon; ``status``, ``snapshot``, ``snapshots``,
``restore`` administer one through the client SDK; ``snapshot reshard`` re-shards a sharded
snapshot offline (:mod:`paramserve.server.reshard`); ``top`` watches a job's servers live
(:mod:`paramserve.server.top`); ``demo`` runs the end-to-end demo and
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
from typing import TYPE_CHECKING, Any

from paramserve.wire import DEFAULT_ADDRESS

from .client_flags import add_tls_token_flags, client_security, job_address
from .errors import StartupRefused
from .settings import LOG_FORMATS, LOG_LEVELS, ConfigError

if TYPE_CHECKING:
    from .config import ServerConfig

# The admin commands (status, snapshot, ...) and --help import only the SDK: the daemon's
# modules (optim_core, numba, ml_dtypes, prometheus_client, ...) are imported by `serve`.

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
    from .config import parse_bytes

    try:
        return parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_BINARY_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def _shown_default(name: str) -> str:
    """A setting's declared default as ``--help`` shows it (64MiB, 10, on, ...)."""
    from .config import default_value

    value = default_value(name)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if name.endswith("_bytes"):
        for unit, size in _BINARY_UNITS:
            if value % size == 0:
                return f"{value // size}{unit}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _with_default(text: str, name: str) -> str:
    return f"{text} (default: {_shown_default(name)})"


SERVE_HELP = "run the parameter server until SIGTERM/SIGINT"
SUBCOMMANDS = {
    "serve": SERVE_HELP,
    "status": "print a server's status (version, rounds, workers) as JSON",
    "snapshot": "take a snapshot on the server's disk and print it as JSON (`snapshot "
    "reshard`: re-shard a sharded snapshot offline)",
    "snapshots": "list the server's snapshots as JSON, oldest first",
    "restore": "validate a snapshot, restore it, and print the version the model is back at",
    "download": "save a snapshot to a file (a sharded job's: to a directory with a manifest)",
    "upload": "store a snapshot file or a sharded snapshot directory on the server(s), "
    "re-sharded on the way when the job has another number of shards",
    "top": "watch a job's servers live: versions, rounds, pushes, bytes, workers, snapshots",
    "demo": "run the end-to-end demo: a server and workers (see `paramserve demo --help`)",
    "worker": "run one demo worker against a running server (see `paramserve worker --help`)",
}


def _add_serve_parser(sub: argparse._SubParsersAction, *, options: bool = True) -> None:
    """The ``serve`` subcommand; with ``options`` False only its name and description (enough
    for ``paramserve --help`` and admin commands, which then skip the daemon's imports)."""
    # No abbreviations: `--token SECRET` must not pass for `--tokens-file`.
    p = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP + ".", allow_abbrev=False)
    if not options:
        return
    from paramserve.optim_core import DEVICES

    from .aggregation import DEADLINE_POLICIES, MODES, REDUCTIONS
    from .gradients import NONFINITE_POLICIES

    d = _with_default
    p.epilog = (
        "Each setting also comes from $PARAMSERVE_<NAME> (e.g. PARAMSERVE_MODE=sync) or the "
        "TOML file; flags win over the environment, which wins over the file."
    )
    p.add_argument("--config", metavar="TOML", help="TOML file (also $PARAMSERVE_CONFIG)")
    net = p.add_argument_group("network")
    net.add_argument("--host", help=d("address to listen on; 127.0.0.1 is loopback only", "host"))
    net.add_argument("--port", type=int, help=d("port to listen on; 0 picks a free one", "port"))
    net.add_argument(
        "--metrics-port", type=int, help=d("Prometheus /metrics port; 0 = off", "metrics_port")
    )
    net.add_argument(
        "--grace-s", type=float, help=d("seconds in-flight calls get at shutdown", "grace_s")
    )
    net.add_argument(
        "--max-workers",
        type=int,
        help=d("RPC threads (sync rounds hold one per waiting worker)", "max_workers"),
    )
    sec = p.add_argument_group(
        "security (tokens: --tokens-file or $PARAMSERVE_ADMIN_TOKEN/$PARAMSERVE_WORKER_TOKEN)"
    )
    sec.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="server certificate chain (default: no TLS)"
    )
    sec.add_argument(
        "--tls-key", type=Path, metavar="PEM", help="server private key (default: none)"
    )
    sec.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates this CA signed (mutual TLS; default: off)",
    )
    sec.add_argument(
        "--tokens-file",
        type=Path,
        metavar="FILE",
        help="TOML/JSON {admin=[..], worker=[..]} (default: none; no token at all turns "
        "authentication off)",
    )
    train = p.add_argument_group("training")
    train.add_argument(
        "--optimizer",
        help=d("optimizer when a model is created without one: a name or Keras JSON", "optimizer"),
    )
    train.add_argument(
        "--device",
        choices=DEVICES,
        help=d("where the model lives (auto: a GPU if usable)", "device"),
    )
    train.add_argument("--mode", choices=MODES, help=d("aggregation mode", "mode"))
    train.add_argument("--replicas", type=int, help=d("workers per synchronous round", "replicas"))
    train.add_argument(
        "--reduction", choices=REDUCTIONS, help=d("how a round combines gradients", "reduction")
    )
    train.add_argument(
        "--round-timeout-s",
        "--round-deadline-s",
        dest="round_timeout_s",
        type=float,
        help=d("seconds a round (or a stale-mode wait) may take", "round_timeout_s"),
    )
    train.add_argument(
        "--deadline-policy",
        choices=DEADLINE_POLICIES,
        help=d("a round past its deadline: apply what arrived, or abort it", "deadline_policy"),
    )
    train.add_argument(
        "--max-staleness",
        type=int,
        help=d("stale mode: pushes a worker may run ahead of the slowest", "max_staleness"),
    )
    train.add_argument(
        "--shards", type=int, help=d("server processes of the job (sharded jobs)", "shards")
    )
    train.add_argument(
        "--shard-index",
        type=int,
        help=d(
            "this daemon's index in [0, --shards) (a StatefulSet: the pod ordinal)", "shard_index"
        ),
    )
    train.add_argument(
        "--nonfinite",
        choices=NONFINITE_POLICIES,
        help=d("what a gradient with NaN/Inf gets", "nonfinite"),
    )
    train.add_argument(
        "--apply-threads",
        type=int,
        help=d(
            "cores the fused optimizer kernels (and the rounding of compressed pulls) use "
            "on variables of 1M elements or more; 0 = auto: the cores less two, at most 4",
            "apply_threads",
        ),
    )
    snap = p.add_argument_group("snapshots")
    snap.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="enables snapshots, stored here (default: none, snapshots off)",
    )
    snap.add_argument(
        "--snapshot-every-s",
        type=float,
        help=d("seconds between periodic snapshots; 0 = off", "snapshot_every_s"),
    )
    snap.add_argument(
        "--keep-snapshots", type=int, help="keep only the newest N (default: keep all)"
    )
    snap.add_argument(
        "--snapshot-on-exit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=d("final snapshot at shutdown", "snapshot_on_exit"),
    )
    snap.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=d("restore the newest valid snapshot at start", "resume"),
    )
    snap.add_argument(
        "--push-log",
        type=Path,
        metavar="PATH",
        help="append a JSON line per applied push, in apply order (audit, replay; default: off)",
    )
    lim = p.add_argument_group("limits (byte sizes accept 64MiB, 8GiB, ...)")
    limit_help = {
        "max_message_bytes": "one gRPC message",
        "max_tensor_bytes": "one tensor's payload",
        "max_request_bytes": "all tensors of one request",
        "max_state_bytes": "variables plus optimizer state (and uploaded snapshots)",
        "max_variables": "variables of a model, tensors in one request",
        "max_concurrent_streams": "calls in flight on the whole server",
    }
    for name, text in limit_help.items():
        flag = "--" + name.replace("_", "-")
        if name.endswith("_bytes"):
            lim.add_argument(flag, type=_bytes_arg, metavar="BYTES", help=d(text, name))
        else:
            lim.add_argument(flag, type=int, help=d(text, name))
    _add_logging_flags(p, serve=True)


def _add_logging_flags(p: argparse.ArgumentParser, *, serve: bool = False) -> None:
    level = _shown_default("log_level") if serve else "warning"
    log_format = _shown_default("log_format") if serve else "text"
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, help=f"log events from this level (default: {level})"
    )
    p.add_argument(
        "--log-format", choices=LOG_FORMATS, help=f"one line per event (default: {log_format})"
    )


def _add_admin_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=SUBCOMMANDS[name], description=SUBCOMMANDS[name] + ".")
    p.add_argument(
        "--address",
        default=os.environ.get("PARAMSERVE_ADDRESS", DEFAULT_ADDRESS),
        help="server host:port, or every shard's host:port of a sharded job, comma-separated, "
        f"shard 0 first (default: $PARAMSERVE_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--timeout-s", type=float, default=60.0, help="deadline of the call (default: 60)"
    )
    role = "a worker's or an admin's" if name == "status" else "an admin's"
    add_tls_token_flags(p, token_role=role)
    _add_logging_flags(p)
    return p


RESHARD_HELP = (
    "re-shard a sharded snapshot offline: read the directory IN (manifest.json and one "
    "shard-i.safetensors per shard), verify every file, and write the same model and optimizer "
    "state for a job of --shards shards into the new directory OUT"
)


def _add_reshard_parser(snapshot: argparse.ArgumentParser) -> None:
    """``paramserve snapshot reshard IN OUT --shards N``: no server, no SDK call."""
    sub = snapshot.add_subparsers(dest="snapshot_command", metavar="{reshard}")
    p = sub.add_parser(
        "reshard", help=RESHARD_HELP, description=RESHARD_HELP + ".", allow_abbrev=False
    )
    p.add_argument("in_dir", type=Path, metavar="IN", help="the sharded snapshot to read")
    p.add_argument("out_dir", type=Path, metavar="OUT", help="new (or empty) directory to write")
    p.add_argument(
        "--shards", type=int, required=True, metavar="N", help="shards of the job to restore into"
    )
    p.add_argument(
        "--split-threshold-bytes",
        type=_bytes_arg,
        metavar="BYTES",
        help="split variables of at least this size by rows across the shards, if the "
        "optimizer allows (default: the threshold in IN's manifest, the job's own)",
    )
    _add_logging_flags(p)


def _run_reshard(args: argparse.Namespace) -> int:
    from .reshard import reshard  # numpy, safetensors, optim_core: only when it runs

    configure_logging(level=args.log_level or "warning", log_format=args.log_format or "text")
    manifest = reshard(
        args.in_dir,
        args.out_dir,
        args.shards,
        split_threshold_bytes=args.split_threshold_bytes,
    )
    print(json.dumps(manifest, indent=2))
    print(
        f"resharded {args.in_dir} (version {manifest['version']}) for {manifest['shards']} "
        f"shard(s) into {args.out_dir}: restore shard-i.safetensors on shard i",
        file=sys.stderr,
    )
    return 0


def build_parser(*, serve_options: bool = True) -> argparse.ArgumentParser:
    """The ``paramserve`` command line; ``serve_options=False`` leaves out ``serve``'s flags
    (and the daemon modules their choices and defaults come from)."""
    parser = argparse.ArgumentParser(
        prog="paramserve", description="paramserve: a parameter server for ML training"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(sub, options=serve_options)
    for name in ("status", "snapshot", "snapshots"):
        _add_admin_parser(sub, name)
    _add_reshard_parser(sub.choices["snapshot"])
    restore = _add_admin_parser(sub, "restore")
    restore.add_argument(
        "snapshot_id",
        metavar="ID",
        help="the snapshot's id (see `snapshots`), or latest (a sharded job: the newest cut "
        "every shard holds)",
    )
    download = _add_admin_parser(sub, "download")
    download.add_argument(
        "snapshot_id", metavar="ID", help="the snapshot's id (see `snapshots`), or latest"
    )
    download.add_argument(
        "path", type=Path, metavar="PATH", help="file to write (a sharded job: a directory)"
    )
    upload = _add_admin_parser(sub, "upload")
    upload.add_argument(
        "path",
        type=Path,
        metavar="PATH",
        help="snapshot file, or a sharded snapshot's directory (of any shard count)",
    )
    upload.add_argument("--restore", action="store_true", help="restore it once stored and checked")
    from .top import add_top_parser  # its flags only: rich is imported when `top` runs

    _add_logging_flags(add_top_parser(sub, SUBCOMMANDS["top"]))
    # Listed for --help only: main() hands `demo ...` to the demo's own parser.
    for name in ("demo", "worker"):
        sub.add_parser(name, help=SUBCOMMANDS[name], description=SUBCOMMANDS[name] + ".")
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
    from .config import load_config

    overrides = {k: v for k, v in vars(args).items() if k not in _SERVE_NON_CONFIG}
    return load_config(config_file=args.config, env=env, overrides=overrides)


def _run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # every setting is checked before anything starts
    from .app import serve

    configure_logging(level=config.log_level, log_format=config.log_format)
    return serve(config)


def _run_admin(args: argparse.Namespace) -> int:
    from paramserve.client import Client

    configure_logging(level=args.log_level or "warning", log_format=args.log_format or "text")
    security = client_security(args)  # a cert without its key, a token file others can read
    address = job_address(args.address)
    with Client(address, timeout_s=args.timeout_s, wait_for_ready=False, **security) as client:
        if args.command == "status":
            result = client.status()
            if not isinstance(address, str):
                # A sharded job: where each variable lives, besides each shard's status.
                description = client.describe() if result.has_model else None
                layout = description.layout.to_json() if description is not None else None
                result = {"status": result, "layout": layout}
        elif args.command == "snapshot":
            result = client.snapshot()
        elif args.command == "snapshots":
            result = client.list_snapshots()
        elif args.command == "download":
            snapshot_id = _snapshot_id(client, args, "download")
            path = client.download_snapshot(snapshot_id, args.path)
            result = {"id": snapshot_id, "path": str(path)}
        elif args.command == "upload":
            result = client.upload_snapshot(args.path, restore=args.restore)
        else:
            result = client.restore(_snapshot_id(client, args, "restore"))
    print(json.dumps(_jsonable(result), indent=2))
    if args.command == "restore":
        # The JSON above is for scripts; this says what happened.
        print(
            f"restored snapshot {result.id}: the model is back at version {result.version}",
            file=sys.stderr,
        )
    return 0


def _snapshot_id(client: Any, args: argparse.Namespace, what: str) -> str:
    """``args.snapshot_id``, with ``latest`` the newest snapshot (a sharded job's: the newest
    cut every shard holds)."""
    if args.snapshot_id != "latest":
        return args.snapshot_id
    listed = client.list_snapshots()
    if not listed:
        raise ValueError(f"{args.address} holds no snapshot to {what}")
    return listed[-1].id


def _is_sdk_error(exc: BaseException) -> bool:
    """An SDK error: it carries the gRPC code and the server's message (or the SDK's)."""
    from paramserve.client import ParamServeError

    return isinstance(exc, ParamServeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``paramserve`` console script; returns the exit status.

    Errors are one line on stderr, no traceback: 2 for a setting or flag that is refused,
    1 for anything else (unreachable server, port taken, a call the server refused).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        # The demo parses its own flags; argparse's REMAINDER would refuse leading --flags.
        from .demo import main as demo_main

        return int(demo_main(argv[1:]) or 0)
    if argv[:1] == ["worker"]:
        from .demo import worker_main

        return worker_main(argv[1:])
    # Only `serve` needs its flags' choices and defaults, which import the daemon's modules.
    args = build_parser(serve_options=argv[:1] == ["serve"]).parse_args(argv)
    prefix = f"paramserve {args.command}"
    try:
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "top":
            from .top import run_top

            configure_logging(
                level=args.log_level or "warning", log_format=args.log_format or "text"
            )
            return run_top(args)
        if getattr(args, "snapshot_command", None) == "reshard":
            prefix += " reshard"
            return _run_reshard(args)
        return _run_admin(args)
    except ConfigError as exc:
        print(f"{prefix}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.command == "serve" and not isinstance(exc, (OSError, StartupRefused)):
            raise  # a bug in the daemon: the traceback is what helps
        if args.command != "serve" and not _is_sdk_error(exc):
            logger.debug("%s failed", args.command, exc_info=True)  # --log-level debug
        # The port or directory is taken, the server is unreachable or refused the call, a
        # file cannot be read: the message says which.
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
