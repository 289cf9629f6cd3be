"""Checking settings: the error a bad one raises, and the checks each settings class runs.

Every group of settings validates itself where it is declared (:class:`ServerConfig`, the
:class:`~paramserve.server.aggregation.AggregationConfig` and the
:class:`~paramserve.server.limits.Limits` it nests), with these checks, so a value is
refused with the same message whether it came from a flag, the environment, a TOML file or
Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The choices of ServerConfig.log_format and log_level (also the admin commands' flags).
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type, or out of range."""


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}")


def check_min(name: str, value: float, minimum: float, *, integer: bool = False) -> None:
    """ConfigError unless ``value >= minimum``, finite (and, with ``integer``, an int)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    _check_finite(name, value)
    if value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}. Received: {name}={value}")


def check_positive(name: str, value: float) -> None:
    """ConfigError unless ``value > 0`` (and finite)."""
    _check_finite(name, value)
    if not value > 0:
        raise ConfigError(f"`{name}` must be > 0. Received: {name}={value}")


def _check_finite(name: str, value: float) -> None:
    """ConfigError for NaN and infinities (``--grace-s nan`` parses as a float)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number. Received: {name}={value}")
