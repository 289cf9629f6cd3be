"""Daemon configuration: defaults < TOML file < environment (PARAMSERVE_*) < command-line flags.

:class:`ServerConfig` nests the settings other modules declare and validate: ``aggregation``
(an :class:`~paramserve.server.aggregation.AggregationConfig`: mode, replicas, reduction,
round deadline, staleness) and ``limits`` (a :class:`~paramserve.server.limits.Limits`).
Every setting, nested or not, has one flat name, the same at each level: ``port = 50051`` or
``mode = "sync"`` in TOML (limits either at the top level or in a ``[limits]`` table),
``PARAMSERVE_MODE=sync`` in the environment, ``--mode sync`` on the command line, and
``config.replace(mode="sync")`` in Python. Byte sizes accept plain integers or strings like
``"64MiB"``.

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

from paramserve.optim_core import DEVICES
from paramserve.wire import DEFAULT_HOST, DEFAULT_PORT, auto_threads

from .aggregation import AggregationConfig
from .gradients import NONFINITE_POLICIES
from .limits import Limits
from .model import make_optimizer, parse_optimizer
from .settings import LOG_FORMATS, LOG_LEVELS, ConfigError, check_choice, check_min

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ConfigError", "ServerConfig", "format_address", "load_config", "parse_bytes"]

ENV_PREFIX = "PARAMSERVE_"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `paramserve serve` can be told; see the module docstring for the sources."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    device: str = "cpu"
    # Used when CreateModel sends an empty optimizer_json: a name or a JSON serialization dict.
    optimizer: str = "adam"
    # How pushes become optimizer steps (set by their own names: mode, replicas, ...).
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
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
    # Size limits (set by their own names: max_message_bytes, ...).
    limits: Limits = field(default_factory=Limits)
    # Prometheus endpoint port; 0 turns it off.
    metrics_port: int = 0
    # Seconds in-flight calls get to finish on shutdown.
    grace_s: float = 10.0
    # Threads serving RPCs; sync rounds hold one per waiting worker.
    max_workers: int = 64
    # Cores the fused CPU optimizer kernels, and the rounding of a compressed pull, use on a
    # large variable (see apply_threads_for);
    # 0: auto, the cores this process may run on less two for the RPC threads, at most 4
    # (1, one thread, on 3 cores or fewer).
    apply_threads: int = 0
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
    # This daemon's place in a sharded job: shard `shard_index` of `shards` (1: on its own).
    # It serves only clients that see the job the same way (see client/sharded.py).
    shards: int = 1
    shard_index: int = 0

    def __post_init__(self) -> None:
        """ConfigError for a setting out of range (the nested groups checked themselves)."""
        check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        check_choice("device", self.device, DEVICES)
        check_choice("log_format", self.log_format, LOG_FORMATS)
        check_choice("log_level", self.log_level, LOG_LEVELS)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"`port` must be in [0, 65535]. Received: port={self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"`metrics_port` must be in [0, 65535]. Received: metrics_port={self.metrics_port}"
            )
        check_min("max_workers", self.max_workers, 2)
        check_min("shards", self.shards, 1, integer=True)
        check_min("shard_index", self.shard_index, 0, integer=True)
        if self.shard_index >= self.shards:
            raise ConfigError(
                f"`shard_index` must be in [0, shards) = [0, {self.shards}). Received: "
                f"shard_index={self.shard_index}"
            )
        check_min("apply_threads", self.apply_threads, 0, integer=True)
        check_min("snapshot_every_s", self.snapshot_every_s, 0)
        check_min("grace_s", self.grace_s, 0)
        if self.keep_snapshots is not None:
            check_min("keep_snapshots", self.keep_snapshots, 1)
        if not self.host:
            raise ConfigError("`host` must not be empty")
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
        if self.keep_snapshots is not None and self.checkpoint_dir is None:
            raise ConfigError("`keep_snapshots` needs a `checkpoint_dir` to keep them in")
        replicas = self.aggregation.replicas
        if self.aggregation.mode == "sync" and replicas > self.max_workers:
            raise ConfigError(
                f"`replicas` ({replicas}) must not exceed `max_workers` ({self.max_workers}): "
                "a synchronous round holds one RPC thread per waiting worker, so it could "
                f"never fill; raise max_workers to at least {replicas}"
            )
        _check_optimizer(self.optimizer)

    @property
    def address(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        return format_address(self.host, self.port)

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` applied, each setting by its flat name (``mode``,
        ``max_message_bytes``, ``port``, ...), converted as a TOML or environment value is."""
        return _build(self, changes)


def apply_threads_for(setting: int, cores: int | None = None) -> int:
    """The optimizer kernels' thread count for an ``apply_threads`` setting (0: auto, from
    ``cores``, by default the cores this process may run on; see ``wire.auto_threads``)."""
    return setting if setting > 0 else auto_threads(cores)


def _check_optimizer(optimizer: str) -> None:
    """ConfigError unless optim_core can build ``optimizer`` (a name or a Keras JSON config)."""
    try:
        make_optimizer(parse_optimizer(optimizer))
    except Exception as exc:  # InvalidArgument from the checks, or anything the optimizer raises
        raise ConfigError(f"`optimizer`: {exc}. Received: optimizer={optimizer!r}") from None


def format_address(host: str, port: int) -> str:
    """``host:port`` as gRPC wants it (an IPv6 host in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# Secrets: read from the environment under these names only (never TOML or flags).
_TOKEN_ENV_NAMES = {"admin_tokens": "ADMIN_TOKEN", "worker_tokens": "WORKER_TOKEN"}
# The nested groups of settings, each set by the names of its own fields.
_SECTIONS: dict[str, type] = {"aggregation": AggregationConfig, "limits": Limits}
_TOP_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig) if f.name not in _SECTIONS}
_SECTION_OF = {f.name: s for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
_FIELDS = {
    **_TOP_FIELDS,
    **{f.name: f for cls in _SECTIONS.values() for f in dataclasses.fields(cls)},
}
assert len(_FIELDS) == len(_TOP_FIELDS) + len(_SECTION_OF), "a setting name is used twice"
_LIMIT_FIELDS = frozenset(n for n, s in _SECTION_OF.items() if s == "limits")
# Every setting's flat name: TOML keys, PARAMSERVE_<NAME> variables, --flags, replace().
FIELD_NAMES = tuple(_FIELDS)


def default_value(name: str) -> Any:
    """The declared default of a setting, by its flat name (``mode``, ``grace_s``, ...)."""
    f = _FIELDS[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


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
    kind = _FIELDS[name].type
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
    nested: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for name, value in changes.items():
        if name in _TOP_FIELDS:
            top[name] = _convert(name, value)
        elif name in _SECTION_OF:
            nested[_SECTION_OF[name]][name] = _convert(name, value)
        else:
            raise ConfigError(f"unknown configuration key {name!r}; known: {sorted(FIELD_NAMES)}")
    for section, values in nested.items():
        if values:  # the group checks itself
            top[section] = dataclasses.replace(getattr(base, section), **values)
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
