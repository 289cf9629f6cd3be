"""RemoteOptimizer: a Keras-style optimizer whose update runs on the parameter server.

Code written for a Keras 3 (or optim_core) optimizer changes one line::

    opt = paramserve.optim_core.Adam(1e-3)       # local
    opt = RemoteOptimizer(Client(address))       # remote: same calls below
    opt.apply_gradients(zip(grads, params))      # params updated in place

``apply`` pushes the gradients, pulls the new weights and writes them into the caller's
arrays (NumPy arrays, CuPy arrays or optim_core Variables) in place: in one Step call
(one round trip) while both directions are at most ``step_max_bytes`` (default
:data:`STEP_MAX_BYTES`, 1 MiB), otherwise as a streamed push and pull. The optimizer's
slots, step counter and hyperparameters live on the server; the properties here read
and change them there.

The one subtlety: in sync mode the server applies one combined update per round, so
``apply`` blocks until every replica has pushed for the current version and the round
has closed (or hit its deadline). The weights written back are the round's result,
which includes the other workers' gradients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from paramserve import optim_core
from paramserve.wire import SparseRows

from .client import Client
from .results import ModelDescription, TensorSpec
from .streams import as_host_array, as_wire_value, cast_gradient

# Largest gradient payload (and weights payload) that apply() sends in one Step call rather
# than a streamed push and pull: below it, the saved round trip dominates; above it, one big
# message costs more than chunked streams (bench/step.py measures both: docs/benchmarks.md).
STEP_MAX_BYTES = 1 << 20


def _key(variable: Any) -> int:
    """Identity of a variable: the array a Variable wraps, or the array itself."""
    return id(variable.value) if isinstance(variable, optim_core.Variable) else id(variable)


def _writable(variable: Any, name: str) -> Any:
    """The array the new weights of ``name`` are written into; TypeError/ValueError if it
    cannot be written in place (checked before anything is pushed)."""
    target = variable.value if isinstance(variable, optim_core.Variable) else variable
    if isinstance(target, np.ndarray):
        if not target.flags.writeable:
            raise ValueError(
                f"The array for {name!r} is read-only; RemoteOptimizer writes the new weights "
                "into the variables in place. Pass a writable array."
            )
        return target
    if hasattr(target, "__cuda_array_interface__"):
        return target
    raise TypeError(
        "RemoteOptimizer writes the new weights into the variables in place, so they must be "
        f"NumPy/CuPy arrays or optim_core Variables. Received for {name!r}: {type(variable)}"
    )


def _assign(target: Any, value: np.ndarray) -> None:
    """Overwrite ``target`` (checked by :func:`_writable`) in place with ``value``."""
    if isinstance(target, np.ndarray):
        np.copyto(target, value)
    else:
        target[...] = optim_core.array_module("gpu").asarray(value)


class RemoteOptimizer:
    """Mirrors :class:`paramserve.optim_core.Optimizer`'s API against a server's model.

    Variables are matched to the server's variables by name, never by position: an
    optim_core ``Variable``'s ``path``, or the keys of a ``{server name: array}`` mapping
    given to :meth:`build`. A plain array is matched only when its shape and dtype identify
    exactly one server variable; when several share them, :meth:`build` refuses (pass
    Variables or a mapping). Later calls may pass any subset of the same objects.

    Before the first step, write the server's weights into the variables with
    :meth:`pull`, so that the first gradients are computed from them.
    """

    def __init__(self, client: Client, *, step_max_bytes: int = STEP_MAX_BYTES) -> None:
        """``step_max_bytes``: :meth:`apply` uses one Step call while both the gradients it
        sends and the weights it gets back are at most this many bytes (0: always push
        then pull)."""
        if step_max_bytes < 0:
            raise ValueError(f"`step_max_bytes` must be >= 0. Received: {step_max_bytes}")
        self.client = client
        self.step_max_bytes = step_max_bytes
        self.built = False
        self._variables: list[Any] = []
        self._names_by_key: dict[int, str] = {}
        self._specs: dict[str, TensorSpec] = {}

    # --- building -----------------------------------------------------------------------
    def build(self, variables: Iterable[Any] | Mapping[str, Any]) -> None:
        """Match ``variables`` to the server model's variables by name; check shapes, dtypes
        and that each can be written in place.

        ``variables``: optim_core Variables (matched by ``path``), a ``{server name: array}``
        mapping, or arrays whose shape and dtype each identify one server variable.
        """
        description = self.client.describe()
        specs = {s.name: s for s in description.variables}
        if isinstance(variables, Mapping):
            pairs = list(variables.items())
            variables = [v for _, v in pairs]
            named = [(i, name, var) for i, (name, var) in enumerate(pairs)]
        else:
            variables = list(variables)
            named = _match_by_name(variables, specs)
        names: dict[int, str] = {}
        for i, name, var in named:
            spec = specs.get(name)
            if spec is None:
                raise ValueError(
                    f"Variable #{i} is named {name!r}, which the server's model does not have; "
                    f"its variables are {description.variable_names}"
                )
            if tuple(var.shape) != spec.shape or np.dtype(var.dtype) != spec.numpy_dtype:
                raise ValueError(
                    f"Variable #{i} does not match server variable {name!r}: expected "
                    f"{spec.dtype} {list(spec.shape)}, received "
                    f"{np.dtype(var.dtype).name} {list(var.shape)}"
                )
            if name in names.values():
                raise ValueError(f"Two variables were matched to server variable {name!r}")
            _writable(var, name)
            names[_key(var)] = name
        self._specs = specs
        self._variables = variables
        self._names_by_key = names
        self.built = True

    def _name(self, variable: Any) -> str:
        name = self._names_by_key.get(_key(variable))
        if name is None and isinstance(variable, optim_core.Variable):
            name = variable.path if variable.path in self._specs else None
        if name is None:
            raise ValueError(
                f"Unknown variable of shape {np.shape(variable)}. This optimizer can only be "
                "called for the variables it was originally built with."
            )
        return name

    def _prepare(self, grad: Any, name: str) -> Any:
        """Gradient as the server wants it: host memory, the variable's dtype (Keras casts;
        see the Client's ``strict_dtypes``)."""
        dtype = self._specs[name].numpy_dtype
        return cast_gradient(name, as_wire_value(grad), dtype, strict=self.client.strict_dtypes)

    # --- applying gradients -------------------------------------------------------------
    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> int:
        """Keras's ``apply_gradients(zip(grads, vars))``; returns the new iteration count."""
        grads, variables = zip(*grads_and_vars, strict=True)
        return self.apply(list(grads), list(variables))

    def apply(self, grads: Sequence[Any], trainable_variables: Iterable[Any] | None = None) -> int:
        """Push ``grads``, then write the new weights into ``trainable_variables`` in place.

        ``None`` gradients are skipped (with Keras's warning); their variables are still
        refreshed. Without ``trainable_variables``, the variables it was built with are
        used. Returns the model version (== iterations) the written weights belong to.
        If the pull of the new weights fails midway, NumPy variables may be left partly
        overwritten (they are received into in place): call :meth:`pull` to refresh them.
        """
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built on a list of variables. Call `optimizer.build(variables)` first."
                )
            variables = list(self._variables)
        else:
            variables = list(trainable_variables)
            if not self.built:
                self.build(variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"Got {len(grads)} gradients for {len(variables)} variables; "
                "they must be paired one to one."
            )
        names = [self._name(v) for v in variables]
        if len(set(names)) != len(names):
            raise ValueError(f"A variable was passed twice: {names}")
        # Everything that can fail is checked before the push changes the server.
        targets = [_writable(v, n) for v, n in zip(variables, names, strict=True)]
        payload = {
            n: self._prepare(g, n) for g, n in zip(grads, names, strict=True) if g is not None
        }
        if not payload:
            raise ValueError("No gradients provided for any variable.")
        if len(payload) < len(grads):
            missing = [n for g, n in zip(grads, names, strict=True) if g is None]
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss.",
                stacklevel=2,
            )
        if self._fits_one_step(payload, names):
            weights = self.client.step(payload, names=names)
            for target, name in zip(targets, names, strict=True):
                _assign(target, weights[name])
            return weights.version
        result = self.client.push(payload)
        return self._write_back(targets, names, min_version=result.version)

    def _fits_one_step(self, payload: dict[str, Any], names: list[str]) -> bool:
        """Small enough both ways for one Step (one round trip instead of push + pull)."""
        sent = sum(
            v.indices.nbytes + v.values.nbytes if isinstance(v, SparseRows) else v.nbytes
            for v in payload.values()
        )
        returned = sum(
            math.prod(self._specs[n].shape) * self._specs[n].numpy_dtype.itemsize for n in names
        )
        return max(sent, returned) <= self.step_max_bytes

    def _write_back(self, targets: list[Any], names: list[str], *, min_version: int) -> int:
        # Host arrays that fit are received into directly (no temporary, no extra copy).
        direct = {}
        for target, name in zip(targets, names, strict=True):
            spec = self._specs[name]
            if (
                isinstance(target, np.ndarray)
                and target.flags.c_contiguous
                and target.flags.writeable
                and target.dtype == spec.numpy_dtype
                and target.shape == spec.shape
            ):
                direct[name] = target
        weights = self.client.pull(names, min_version=min_version, out=direct)
        for target, name in zip(targets, names, strict=True):
            if name not in direct:
                _assign(target, weights[name])
        return weights.version

    def pull(self, variables: Iterable[Any] | Mapping[str, Any] | None = None) -> int:
        """Overwrite the variables with the server's current weights (before the first step
        of a worker, after a restore); returns their version. Builds on ``variables`` first
        when not built yet (same forms as :meth:`build`)."""
        if variables is not None and not self.built:
            self.build(variables)
        if isinstance(variables, Mapping):
            variables = list(variables.values())
        variables = list(self._variables if variables is None else variables)
        names = [self._name(v) for v in variables]
        targets = [_writable(v, n) for v, n in zip(variables, names, strict=True)]
        return self._write_back(targets, names, min_version=0)

    # --- server-side state ---------------------------------------------------------------
    def _describe(self) -> ModelDescription:
        return self.client.describe()

    @property
    def iterations(self) -> int:
        """Completed optimizer steps on the server (the model version)."""
        return self.client.status().version

    @property
    def learning_rate(self) -> np.float32:
        """The server optimizer's current learning rate (float32, as optim_core keeps it)."""
        return np.float32(self._describe().hyperparameters["learning_rate"])

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self.client.set_hyperparameters(learning_rate=float(value))

    @property
    def name(self) -> str:
        return self.get_config().get("name", "")

    def get_config(self) -> dict[str, Any]:
        """The server optimizer's config (Keras ``get_config()`` form)."""
        return dict(self._describe().optimizer.get("config", {}))

    @property
    def variables(self) -> list[TensorSpec]:
        """Names, dtypes and shapes of the server-side optimizer variables, in Keras order."""
        return self._describe().optimizer_variables

    def get_weights(self) -> list[np.ndarray]:
        """Server-side optimizer variables (iteration count first), in optim_core order."""
        return list(self.client.optimizer_state().values())

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Replace the server-side optimizer variables with :meth:`get_weights`-style arrays."""
        specs = self.variables
        weights = list(weights)
        if len(weights) != len(specs):
            raise ValueError(
                f"`set_weights()` expects {len(specs)} arrays (the length of "
                f"`optimizer.variables`), received {len(weights)}."
            )
        self.client.set_optimizer_state(
            {s.name: as_host_array(w) for s, w in zip(specs, weights, strict=True)}
        )

    def __repr__(self) -> str:
        return f"<RemoteOptimizer {self.client.address} worker_id={self.client.worker_id!r}>"


def _match_by_name(
    variables: list[Any], specs: dict[str, TensorSpec]
) -> list[tuple[int, str, Any]]:
    """``(index, server name, variable)`` for a list: Variables by ``path``; arrays by a shape
    and dtype that only one server variable has (ValueError when several share them)."""
    out = []
    by_kind: dict[tuple[tuple[int, ...], np.dtype], list[str]] = {}
    for spec in specs.values():
        by_kind.setdefault((spec.shape, spec.numpy_dtype), []).append(spec.name)
    for i, var in enumerate(variables):
        if isinstance(var, optim_core.Variable):
            out.append((i, var.path, var))
            continue
        kind = (tuple(np.shape(var)), np.dtype(var.dtype))
        candidates = by_kind.get(kind, [])
        if len(candidates) != 1:
            found = "no" if not candidates else f"{len(candidates)} ({candidates})"
            raise ValueError(
                f"Cannot match variable #{i} ({kind[1].name} {list(kind[0])}) by name: it is a "
                f"plain array, and {found} server variables have its shape and dtype. Pass "
                "optim_core Variables whose path is the server's name, or a {server name: "
                "array} mapping, e.g. optimizer.build({'dense/kernel': w, ...})."
            )
        out.append((i, candidates[0], var))
    return out
