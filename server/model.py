"""A model definition: variable specs, limits, building or comparing a model, and editing
its hyperparameters.

The store keeps one :class:`Model` at a time; this module checks a requested
definition (names, dtypes, limits, optimizer), builds it on a device, says in
words how two definitions differ, so create/import fail before touching live state,
and validates a hyperparameter change before it makes it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserve import optim_core, wire
from paramserve.optim_core import FLOAT_DTYPES, Optimizer, Slab, Variable

from .errors import FailedPrecondition, InvalidArgument, limit_exceeded
from .limits import Limits

logger = logging.getLogger(__name__)

MAX_NAME_CHARS = 1024
# An optimizer given by name rather than as JSON: "adam", "adam_w", "my.module>Custom", ...
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.>-]*$")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What CuPy arrays hold (bfloat16 variables stay on the host).
_DEVICE_DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class VariableSpec:
    """A variable's name, NumPy dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class ModelState:
    """A consistent host copy of the model: what snapshots hold and restores replace."""

    model_name: str
    optimizer: dict[str, Any]
    variables: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    version: int


@dataclass
class Model:
    """The live model: its variables on the device, their specs, and the optimizer."""

    name: str
    optimizer: Optimizer
    variables: dict[str, Variable]
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]]
    # Optimizer configs (JSON) under which create_model counts as "already exists, identical".
    definitions: set[str] = field(default_factory=set)
    # optimizer_specs_of's answer, for the optimizer it was computed from.
    optimizer_specs: tuple[Optimizer, dict[str, tuple[str, tuple[int, ...]]]] | None = field(
        default=None, repr=False
    )
    # Same-dtype variables packed end to end (optim_core.pack), by their names in order: a
    # push carrying one flat gradient per slab is checked and applied per slab, not per
    # variable (see store.validate_push).
    slabs: dict[tuple[str, ...], Slab] = field(default_factory=dict, repr=False)
    # Where consecutive variables are one stretch of a slab (store._weight_runs, cached).
    weight_runs: list[tuple[int, int, np.ndarray, list[int]]] | None = field(
        default=None, repr=False
    )
    # Every variable's live host array by name (store._whole_model, cached).
    weights: dict[str, Any] | None = field(default=None, repr=False)


def check_name(what: str, name: Any, *, allow_empty: bool = False) -> None:
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} must be a string; got {type(name).__name__}")
    if not name and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument(
            f"{what} {name[:80]!r} must be at most {MAX_NAME_CHARS} characters "
            "without control characters"
        )


def config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=repr)


def _flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flat_config(value, f"{prefix}{key}."))
    return out


def lr_is_schedule(config: dict[str, Any]) -> bool:
    """Whether the (possibly wrapped) optimizer's learning rate is a schedule."""
    if "learning_rate" in config:
        return isinstance(config["learning_rate"], dict)
    inner = config.get("inner_optimizer")
    return isinstance(inner, dict) and lr_is_schedule(inner.get("config") or {})


def parse_optimizer(text: str) -> dict[str, Any] | str:
    """An optimizer from JSON text (a serialization dict or a name); never eval or pickle."""
    text = text.strip()
    if _NAME_RE.match(text):
        return text
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise InvalidArgument(f"optimizer_json is not valid JSON: {exc}") from None
    if not isinstance(value, dict | str):
        raise InvalidArgument(
            "optimizer_json must encode a Keras serialization dict "
            f'({{"class_name": ..., "config": {{...}}}}) or a name, got {type(value).__name__}'
        )
    return value


def make_optimizer(identifier: Any) -> Optimizer:
    """An unbuilt optimizer from a name or Keras serialization dict; InvalidArgument if bad."""
    if not isinstance(identifier, str | dict):
        raise InvalidArgument(
            "the optimizer must be a name or a Keras serialization dict; "
            f"got {type(identifier).__name__}"
        )
    try:
        optimizer = optim_core.get(identifier)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgument(f"invalid optimizer: {exc}") from exc
    assert optimizer is not None
    return optimizer


def check_variables(variables: Any, limits: Limits) -> list[tuple[str, np.ndarray]]:
    """Check names, dtypes and limits of the initial values; returns them in order."""
    if not isinstance(variables, Mapping) or not variables:
        raise InvalidArgument("a model needs at least one variable; got none")
    if len(variables) > limits.max_variables:
        raise limit_exceeded(
            f"the model has {len(variables)} variables, over the limit of "
            f"{limits.max_variables} (max_variables)",
            limit="max_variables",
            limit_value=limits.max_variables,
            requested=len(variables),
        )
    slot_prefixes: dict[str, str] = {}
    total = 0
    out = []
    for name, value in variables.items():
        check_name("a variable name", name)
        # optim_core names slots "{path with / as _}_{slot}": keep them unique.
        prefix = name.replace("/", "_")
        if prefix in slot_prefixes:
            raise InvalidArgument(
                f"variables {slot_prefixes[prefix]!r} and {name!r} would share optimizer "
                "slot names ('/' becomes '_' in slot names); rename one of them"
            )
        slot_prefixes[prefix] = name
        if not isinstance(value, np.ndarray):
            raise InvalidArgument(
                f"variable {name!r} must be a NumPy array; got {type(value).__name__}"
            )
        if value.dtype.name not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"variable {name!r} has dtype {value.dtype.name}, expected a floating "
                f"dtype ({', '.join(FLOAT_DTYPES)})",
                metadata={"variable": name},
                violations=[(f"tensors[{name}].dtype", "must be a floating dtype")],
            )
        if value.nbytes > limits.max_tensor_bytes:
            raise limit_exceeded(
                f"variable {name!r} is {value.nbytes} bytes, over the limit of "
                f"{limits.max_tensor_bytes} bytes (max_tensor_bytes)",
                limit="max_tensor_bytes",
                limit_value=limits.max_tensor_bytes,
                requested=value.nbytes,
                variable=name,
            )
        total += value.nbytes
        out.append((name, value))
    if total > limits.max_state_bytes:
        raise limit_exceeded(
            f"the variables take {total} bytes, over the limit of "
            f"{limits.max_state_bytes} bytes (max_state_bytes)",
            limit="max_state_bytes",
            limit_value=limits.max_state_bytes,
            requested=total,
        )
    return out


def build_model(
    name: str,
    optimizer: Optimizer,
    arrays: list[tuple[str, np.ndarray]],
    *,
    device: str,
    limits: Limits,
) -> Model:
    """Copy the variables to the device, same-dtype ones packed into flat slabs (each
    variable a view of its slab), and build the optimizer's slots on them."""
    for var_name, value in arrays:
        if device != "cpu" and value.dtype.name not in _DEVICE_DTYPES:
            raise InvalidArgument(
                f"variable {var_name!r} ({value.dtype.name}) cannot live on device {device}"
            )
    try:
        packed, slabs = optim_core.pack(arrays, device=None if device == "cpu" else device)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"the variables cannot live on device {device}: {exc}") from exc
    variables: dict[str, Variable] = {v.path: v for v in packed}
    try:
        optimizer.build(list(variables.values()))
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"the optimizer cannot be built on these variables: {exc}") from exc
    state_bytes = sum(int(v.value.nbytes) for v in variables.values())
    state_bytes += sum(int(v.value.nbytes) for v in optimizer.variables)
    if state_bytes > limits.max_state_bytes:
        raise limit_exceeded(
            f"variables and optimizer state take {state_bytes} bytes, over the limit of "
            f"{limits.max_state_bytes} bytes (max_state_bytes)",
            limit="max_state_bytes",
            limit_value=limits.max_state_bytes,
            requested=state_bytes,
        )
    specs = {n: (v.dtype, v.shape) for n, v in variables.items()}
    config = config_json(optim_core.serialize(optimizer))
    if device == "cpu":
        _prepare_kernels()
    else:
        _prepare_gpu_kernels({v.dtype.name for v in variables.values()})
    return Model(name, optimizer, variables, specs, {config}, slabs={s.names: s for s in slabs})


def _prepare_kernels() -> None:
    """Compile or load the fused CPU kernels now, outside the model lock and before the
    model serves, so the first push does not pay seconds for it (logged the first time):
    the optimizer's, and the wire's (pushes are copied into place with them)."""
    wire.prepare_casts()  # (at once when they are ready)
    if optim_core.kernels_prepared():
        return
    started = time.perf_counter()
    available = optim_core.prepare_kernels()
    logger.info(
        "fused optimizer kernels %s in %.2f s",
        "ready" if available else "unavailable (NumPy rules run instead)",
        time.perf_counter() - started,
        extra={"event": "kernels_ready", "available": available},
    )


def _prepare_gpu_kernels(dtypes: set[str]) -> None:
    """Compile or load the fused GPU kernels of the model's dtypes now, for the same reason."""
    wanted = tuple(sorted(dtypes & {"float32", "float64"}))
    if not wanted or optim_core.gpu_kernels_prepared(wanted):
        return
    started = time.perf_counter()
    available = optim_core.prepare_gpu_kernels(wanted)
    logger.info(
        "fused GPU optimizer kernels (%s) %s in %.2f s",
        ", ".join(wanted),
        "ready" if available else "unavailable (CuPy rules run instead)",
        time.perf_counter() - started,
        extra={"event": "gpu_kernels_ready", "available": available},
    )


def describe_difference(model: Model, name: str, specs: list[VariableSpec], config: str) -> str:
    """In words, the first way the requested definition differs from ``model``."""
    if model.name != name:
        return f"the model is named {model.name!r}, the request names {name!r}"
    have = {s.name: s for s in specs_of(model)}
    want = {s.name: s for s in specs}
    if set(have) != set(want):
        return (
            f"variables differ: missing {sorted(set(have) - set(want))}, "
            f"unexpected {sorted(set(want) - set(have))}"
        )
    for spec in specs:
        old = have[spec.name]
        if old != spec:
            return (
                f"variable {spec.name!r} is {old.dtype} {list(old.shape)} on the server, "
                f"{spec.dtype} {list(spec.shape)} in the request"
            )
    if list(have) != list(want):
        return f"variable order differs: the server has {list(have)}"
    current = _flat_config(json.loads(min(model.definitions)))
    requested = _flat_config(json.loads(config))
    diffs = [
        f"{k} is {current.get(k)!r} on the server, {requested.get(k)!r} in the request"
        for k in sorted(set(current) | set(requested))
        if current.get(k) != requested.get(k)
    ]
    return "optimizer differs: " + "; ".join(diffs[:5])


def specs_of(model: Model) -> list[VariableSpec]:
    return [
        VariableSpec(n, dtype.name, tuple(int(d) for d in shape))
        for n, (dtype, shape) in model.specs.items()
    ]


def optimizer_specs_of(model: Model) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtype names and shapes of the optimizer state, in ``state_dict()`` order.

    Computed once per optimizer (the state is copied to the host for it): changing a
    hyperparameter may rebuild the optimizer, never while keeping the old answer.
    """
    cached = model.optimizer_specs
    if cached is None or cached[0] is not model.optimizer:
        state = model.optimizer.state_dict()
        specs = {k: (np.asarray(v).dtype.name, tuple(np.shape(v))) for k, v in state.items()}
        cached = model.optimizer_specs = (model.optimizer, specs)
    return cached[1]


def current_config(model: Model) -> str:
    return config_json(optim_core.serialize(model.optimizer))


# --- hyperparameters ----------------------------------------------------------------------
def hyperparameters_of(optimizer: Optimizer) -> dict[str, float]:
    """The current learning rate and every float-valued optimizer config entry."""
    out = {"learning_rate": float(optimizer.learning_rate)}
    for key, value in optimizer.get_config().items():
        if key != "learning_rate" and type(value) is float:
            out[key] = value
    return out


def edit_hyperparameters(model: Model, values: Mapping[str, Any]) -> None:
    """Change ``model``'s hyperparameters in place; all are validated before any changes.

    A learning rate is set on the optimizer; other values rebuild it from its edited config
    (so its constructor checks them) and carry the slots and step counter over.
    """
    allowed = hyperparameters_of(model.optimizer)
    for key, value in values.items():
        if key not in allowed:
            raise InvalidArgument(
                f"unknown hyperparameter {key!r}; this optimizer accepts {sorted(allowed)}",
                violations=[(f"values[{key}]", "not a hyperparameter of this optimizer")],
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(
                f"hyperparameter {key!r} must be a number; got {type(value).__name__}",
                violations=[(f"values[{key}]", "must be a number")],
            )
        if not math.isfinite(value):
            raise InvalidArgument(
                f"hyperparameter {key!r} must be finite; got {value}",
                violations=[(f"values[{key}]", "must be finite")],
            )
        if key == "learning_rate" and abs(value) > _FLOAT32_MAX:
            raise InvalidArgument(
                f"hyperparameter 'learning_rate' must fit the optimizer's float32 "
                f"learning rate (|value| <= {_FLOAT32_MAX:.6g}); got {value}",
                violations=[(f"values[{key}]", "must fit float32")],
            )
    config = optim_core.serialize(model.optimizer)
    if "learning_rate" in values and lr_is_schedule(config["config"]):
        raise FailedPrecondition(
            "the learning rate follows a schedule and cannot be set to a number"
        )
    others = {k: float(v) for k, v in values.items() if k != "learning_rate"}
    if others:
        config["config"].update(others)
        rebuilt = make_optimizer(config)
        rebuilt.build(list(model.variables.values()))
        try:
            rebuilt.load_state_dict(model.optimizer.state_dict())
        except ValueError as exc:  # e.g. SGD momentum to or from 0 adds or drops slots
            raise FailedPrecondition(
                f"cannot change {sorted(others)} of a live model: the new values change "
                f"the optimizer's state variables ({exc})"
            ) from None
        model.optimizer = rebuilt
    if "learning_rate" in values:
        model.optimizer.learning_rate = float(values["learning_rate"])
