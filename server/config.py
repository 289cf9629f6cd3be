"""Daemon configuration: defaults < TOML file < environment (PARAMSERVE_*) < command-line flags.

Every field of :class:`ServerConfig` (and of its nested :class:`ServerLimits`) can be set at
each level under the same name: ``port = 50051`` in TOML (limits either at the top level or in
a ``[limits]`` table), ``PARAMSERVE_PORT=50051`` in the environment, ``--port 50051`` on the
command line. Byte sizes accept plain integers or strings like ``"64MiB"``.

Tokens are the exception: ``admin_tokens`` and ``worker_tokens`` come only from
``PARAMSERVE_ADMIN_TOKEN`` / ``PARAMSERVE_WORKER_TOKEN`` or from ``tokens_file``, never from
the TOML file or a flag (a flag would show in ``ps``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "PARAMSERVE_"

MODES = ("sync", "async", "stale")
REDUCTIONS = ("sum", "mean")
DEADLINE_POLICIES = ("partial", "abort")
NONFINITE_POLICIES = ("reject", "skip", "allow")
DEVICES = ("auto", "cpu", "gpu")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ServerLimits:
    """Size limits that protect the daemon's memory; over them -> RESOURCE_EXHAUSTED."""

    # One gRPC message (a 4 MiB chunk plus headers fits easily).
    max_message_bytes: int = 64 << 20
    # One tensor's payload.
    max_tensor_bytes: int = 8 << 30
    # All tensor payloads of one request (CreateModel, Push, SetOptimizerState).
    max_request_bytes: int = 16 << 30
    # Variables plus optimizer state held by the store; also bounds uploaded snapshots.
    max_state_bytes: int = 64 << 30
    max_variables: int = 10_000
    # Calls in flight on the whole server, each one HTTP/2 stream (queued calls count too);
    # a call past it is refused with RESOURCE_EXHAUSTED. Health checks count as well.
    max_concurrent_streams: int = 256


@dataclass(frozen=True)
class ServerConfig:
    """Everything `paramserve serve` can be told; see the module docstring for the sources."""

    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"
    # Used when CreateModel sends an empty optimizer_json: a name or a JSON serialization dict.
    optimizer: str = "adam"
    mode: str = "sync"
    replicas: int = 1
    reduction: str = "sum"
    round_timeout_s: float = 30.0
    deadline_policy: str = "partial"
    max_staleness: int = 4
    # None: snapshots disabled (snapshot RPCs answer FAILED_PRECONDITION).
    checkpoint_dir: Path | None = None
    # Seconds between periodic snapshots; 0 turns them off.
    snapshot_every_s: float = 0.0
    # How many snapshots to keep on disk; None keeps all.
    keep_snapshots: int | None = None
    snapshot_on_exit: bool = True
    # Restore the newest valid snapshot of checkpoint_dir at start.
    resume: bool = False
    # Append one JSON line per push that took effect, in apply order (audit, replay); None: off.
    push_log: Path | None = None
    nonfinite: str = "reject"
    limits: ServerLimits = field(default_factory=ServerLimits)
    # Prometheus endpoint port; 0 turns it off.
    metrics_port: int = 0
    # Seconds in-flight calls get to finish on shutdown.
    grace_s: float = 10.0
    # Threads serving RPCs; sync rounds hold one per waiting worker.
    max_workers: int = 64
    log_level: str = "info"
    log_format: str = "text"
    # TLS from PEM files; with tls_client_ca, clients must present a certificate that CA
    # signed (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer tokens (see server/auth.py): a TOML/JSON file that only its owner may read, plus
    # $PARAMSERVE_ADMIN_TOKEN / $PARAMSERVE_WORKER_TOKEN (comma-separated), never flags or
    # the config file. No token at all turns authentication off.
    tokens_file: Path | None = None
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    worker_tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("deadline_policy", self.deadline_policy, DEADLINE_POLICIES)
        _check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("log_format", self.log_format, LOG_FORMATS)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"`port` must be in [0, 65535]. Received: port={self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"`metrics_port` must be in [0, 65535]. Received: metrics_port={self.metrics_port}"
            )
        _check_min("replicas", self.replicas, 1)
        _check_min("max_staleness", self.max_staleness, 0)
        _check_min("max_workers", self.max_workers, 2)
        _check_positive("round_timeout_s", self.round_timeout_s)
        _check_min("snapshot_every_s", self.snapshot_every_s, 0)
        _check_min("grace_s", self.grace_s, 0)
        if self.keep_snapshots is not None:
            _check_min("keep_snapshots", self.keep_snapshots, 1)
        if not self.host:
            raise ConfigError("`host` must not be empty")
        for f in dataclasses.fields(ServerLimits):
            _check_min(f.name, getattr(self.limits, f.name), 1)
        # Room for a useful chunk plus framing in every message.
        _check_min("max_message_bytes", self.limits.max_message_bytes, 64 << 10)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("`tls_cert` and `tls_key` must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("`tls_client_ca` (mutual TLS) needs `tls_cert` and `tls_key`")
        for name in _TOKEN_ENV_NAMES:
            for token in getattr(self, name):
                if not token or any(c.isspace() or c == "," for c in token):
                    raise ConfigError(
                        f"`{name}` (${ENV_PREFIX}{_TOKEN_ENV_NAMES[name]}): a token must be a "
                        "non-empty string without whitespace or commas"
                    )
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("`resume` needs a `checkpoint_dir` to resume from")
        if self.snapshot_every_s > 0 and self.checkpoint_dir is None:
            raise ConfigError("`snapshot_every_s` needs a `checkpoint_dir` to write to")

    @property
    def address(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        return format_address(self.host, self.port)

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` applied (limit fields may be given by their own names)."""
        return _build(self, changes)


def format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}")


def _check_min(name: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}. Received: {name}={value}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"`{name}` must be > 0. Received: {name}={value}")


# Secrets: read from the environment under these names only (never TOML or flags).
_TOKEN_ENV_NAMES = {"admin_tokens": "ADMIN_TOKEN", "worker_tokens": "WORKER_TOKEN"}
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig) if f.name != "limits"}
_LIMIT_FIELDS = {f.name: f for f in dataclasses.fields(ServerLimits)}
FIELD_NAMES = tuple(_CONFIG_FIELDS) + tuple(_LIMIT_FIELDS)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any) -> int:
    """An integer byte count from ``1048576``, ``"1048576"`` or ``"1MiB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a byte size, got {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"expected a byte size like 1048576 or '64MiB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean (true/false), got {value!r}")


def _convert(name: str, value: Any) -> Any:
    """Coerce a TOML, environment or flag value to the field's type."""
    kind = (_CONFIG_FIELDS.get(name) or _LIMIT_FIELDS[name]).type
    try:
        if kind.startswith("tuple"):  # tokens: "a,b" from the environment, or a sequence
            items = value.split(",") if isinstance(value, str) else list(value or ())
            return tuple(str(t).strip() for t in items if str(t).strip())
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            if "None" in str(kind):
                return None
            raise ConfigError("a value is required")
        if name in _LIMIT_FIELDS and name.endswith("_bytes"):
            return parse_bytes(value)
        if kind == "bool":
            return _parse_bool(value)
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"expected an integer, got {value!r}")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ConfigError(f"expected a number, got {value!r}")
            return float(value)
        if kind.startswith("Path"):
            return Path(value).expanduser()
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for `{name}`: {exc}") from None


def _build(base: ServerConfig, changes: Mapping[str, Any]) -> ServerConfig:
    top: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for name, value in changes.items():
        if name in _CONFIG_FIELDS:
            top[name] = _convert(name, value)
        elif name in _LIMIT_FIELDS:
            limits[name] = _convert(name, value)
        else:
            raise ConfigError(f"unknown configuration key {name!r}; known: {sorted(FIELD_NAMES)}")
    if limits:
        top["limits"] = dataclasses.replace(base.limits, **limits)
    return dataclasses.replace(base, **top)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a TOML file, flattened (a ``[limits]`` table merges into the top level)."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    flat = {k: v for k, v in data.items() if k != "limits"}
    table = data.get("limits", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {str(path)!r}: `limits` must be a table")
    for name, value in table.items():
        if name not in _LIMIT_FIELDS:
            raise ConfigError(
                f"config file {str(path)!r}: unknown limit {name!r}; known: {sorted(_LIMIT_FIELDS)}"
            )
        flat[name] = value
    secrets = sorted(set(flat) & set(_TOKEN_ENV_NAMES))
    if secrets:
        raise ConfigError(
            f"config file {str(path)!r}: tokens ({secrets}) do not belong in the config file; "
            "put them in a `tokens_file` only you can read, or in $PARAMSERVE_ADMIN_TOKEN / "
            "$PARAMSERVE_WORKER_TOKEN"
        )
    unknown = sorted(set(flat) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r}: unknown key(s) {unknown}; known: {sorted(FIELD_NAMES)}"
        )
    return flat


def read_env(env: Mapping[str, str]) -> dict[str, str]:
    """Settings from ``PARAMSERVE_<FIELD>`` variables (other PARAMSERVE_* names are ignored)."""
    out = {}
    for name in FIELD_NAMES:
        key = ENV_PREFIX + _TOKEN_ENV_NAMES.get(name, name.upper())
        if key in env:
            out[name] = env[key]
    return out


def load_config(
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge defaults < TOML file < environment < ``overrides`` (flags; None values are unset).

    ``config_file`` defaults to ``$PARAMSERVE_CONFIG`` when set.
    """
    env = os.environ if env is None else env
    if config_file is None:
        config_file = env.get(ENV_PREFIX + "CONFIG") or None
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(read_toml(config_file))
    merged.update(read_env(env))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(ServerConfig(), merged)
