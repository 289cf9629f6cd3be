"""Lookup of optimizers by name, Keras config dict or instance (``get``), and registration."""

from __future__ import annotations

import functools
import inspect
from typing import Any, TypeVar

from .base import Optimizer

OPTIMIZERS_MODULE = "keras.optimizers"

T = TypeVar("T", bound=type[Optimizer])

# Lower-cased class name -> class. Built-ins are added by the package's __init__.
_REGISTRY: dict[str, type[Optimizer]] = {}


def register_optimizer(cls: T | None = None, *, name: str | None = None) -> Any:
    """Register an optimizer class so ``get(name)`` and config dicts can find it.

    Use as ``@register_optimizer`` or ``@register_optimizer(name="mysgd")``; lookup is
    case-insensitive. Registering a second class under a taken name raises.
    """

    def wrap(c: T) -> T:
        if not (isinstance(c, type) and issubclass(c, Optimizer)):
            raise TypeError(f"Only Optimizer subclasses can be registered. Received: {c!r}")
        key = (name or c.__name__).lower()
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not c:
            raise ValueError(f"An optimizer is already registered as {key!r}: {existing!r}")
        _REGISTRY[key] = c
        return c

    return wrap(cls) if cls is not None else wrap


def registered_optimizers() -> dict[str, type[Optimizer]]:
    """A copy of the name -> class table."""
    return dict(_REGISTRY)


def _lookup(name: str) -> type[Optimizer]:
    cls = _REGISTRY.get(name.lower())
    if cls is None:
        raise ValueError(
            f"Could not interpret optimizer identifier: {name!r}. "
            f"Known optimizers: {sorted(_REGISTRY)}"
        )
    return cls


# Key of the serialization dict holding weight-decay exclusions (not part of Keras's format,
# which loses them; Keras ignores the extra key when it reads the dict).
EXCLUSIONS_KEY = "exclude_from_weight_decay"


def serialize(
    optimizer: Optimizer, *, paths_by_id: dict[int, str] | None = None, strict: bool = True
) -> dict[str, Any]:
    """The Keras serialization dict: ``{"module", "class_name", "config", "registered_name"}``.

    Weight-decay exclusions, which Keras's config drops, are added under
    ``"exclude_from_weight_decay"`` (``{"var_names", "var_paths"}``) when there are any, so
    every setting survives the trip (to a server, into a snapshot). ``paths_by_id`` names
    excluded arrays of an unbuilt optimizer; ``strict=False`` leaves out those it cannot
    name instead of raising (see ``Optimizer.weight_decay_exclusions``).
    """
    config = optimizer.get_config()
    inner = getattr(optimizer, "inner_optimizer", None)
    if isinstance(inner, Optimizer) and isinstance(config.get("inner_optimizer"), dict):
        config["inner_optimizer"] = serialize(inner, paths_by_id=paths_by_id, strict=strict)
    out = {
        "module": OPTIMIZERS_MODULE,
        "class_name": type(optimizer).__name__,
        "config": config,
        "registered_name": None,
    }
    exclusions = optimizer.weight_decay_exclusions(paths_by_id, strict=strict)
    if exclusions is not None:
        out[EXCLUSIONS_KEY] = exclusions
    return out


def deserialize(config: dict[str, Any]) -> Optimizer:
    """Rebuild an optimizer from a ``{"class_name", "config"}`` dict (ours or Keras's).

    Whole numbers where the optimizer's defaults are floats (``"learning_rate": 1`` or
    ``"momentum": 0``, as JSON writers in JavaScript and Go serialize 1.0 and 0.0) are read
    as floats.
    """
    if "class_name" not in config or not isinstance(config["class_name"], str):
        raise ValueError(
            "An optimizer config dict needs a 'class_name' string and a 'config' dict. "
            f"Received keys: {sorted(config)}"
        )
    cls = _lookup(config["class_name"])
    options = config.get("config") or {}
    if not isinstance(options, dict):
        raise ValueError(f"An optimizer's 'config' must be a dict. Received: {options!r}")
    optimizer = cls.from_config(_floats_where_expected(cls, options))
    exclusions = config.get(EXCLUSIONS_KEY)
    if exclusions is not None:
        optimizer.exclude_from_weight_decay(**_checked_exclusions(exclusions))
    return optimizer


def _checked_exclusions(value: Any) -> dict[str, list[str]]:
    ok = (
        isinstance(value, dict)
        and set(value) <= {"var_names", "var_paths"}
        and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in value.values())
    )
    if not ok:
        raise ValueError(
            f"'{EXCLUSIONS_KEY}' must be {{'var_names': [str, ...], 'var_paths': [str, ...]}}. "
            f"Received: {value!r:.200}"
        )
    return {k: list(v) for k, v in value.items()}


def get(identifier: str | dict[str, Any] | Optimizer | None) -> Optimizer | None:
    """Return an optimizer for a name (``"adam"``), a Keras config dict, or an instance."""
    if identifier is None:
        return None
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        return _lookup(identifier)()
    raise ValueError(f"Could not interpret optimizer identifier: {identifier!r}")


# Base options whose default is None but whose value is a float.
_FLOAT_OR_NONE_OPTIONS = frozenset(
    {"weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor"}
)


@functools.cache
def _float_options(cls: type[Optimizer]) -> frozenset[str]:
    """Constructor options of ``cls`` that take a float: a float default, or a base option."""
    floats = set(_FLOAT_OR_NONE_OPTIONS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if type(param.default) is float:
                floats.add(name)
    return frozenset(floats)


def _floats_where_expected(cls: type[Optimizer], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with whole numbers turned into floats where ``cls`` takes a float."""
    floats = _float_options(cls)
    return {k: float(v) if type(v) is int and k in floats else v for k, v in options.items()}
