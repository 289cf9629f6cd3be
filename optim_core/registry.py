"""Lookup of optimizers by name, Keras config dict or instance (``get``), and registration."""

from __future__ import annotations

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


def serialize(optimizer: Optimizer) -> dict[str, Any]:
    """The Keras serialization dict: ``{"module", "class_name", "config", "registered_name"}``."""
    return {
        "module": OPTIMIZERS_MODULE,
        "class_name": type(optimizer).__name__,
        "config": optimizer.get_config(),
        "registered_name": None,
    }


def deserialize(config: dict[str, Any]) -> Optimizer:
    """Rebuild an optimizer from a ``{"class_name", "config"}`` dict (ours or Keras's)."""
    if "class_name" not in config or not isinstance(config["class_name"], str):
        raise ValueError(
            "An optimizer config dict needs a 'class_name' string and a 'config' dict. "
            f"Received keys: {sorted(config)}"
        )
    cls = _lookup(config["class_name"])
    return cls.from_config(dict(config.get("config") or {}))


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
