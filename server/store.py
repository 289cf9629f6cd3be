"""The model store: one model's variables and optimizer, thread-safe, on the CPU or a GPU.

Every state change happens under ``store.lock``; ``store.changed`` (a Condition on that
lock) is notified whenever the version or the model changes, so the aggregator and
pulls waiting for a version can sleep on it. The optimizer math is ``optim_core``'s;
this module only checks input, keeps the variables and hands them to the optimizer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from paramserve import optim_core
from paramserve.wire import SparseRows, payload_bytes

from . import gradients
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from .limits import Limits
from .model import (
    Model,
    ModelState,
    VariableSpec,
    build_model,
    check_name,
    check_variables,
    config_json,
    current_config,
    describe_difference,
    edit_hyperparameters,
    hyperparameters_of,
    make_optimizer,
    optimizer_specs_of,
    specs_of,
)
from .settings import check_choice

logger = logging.getLogger(__name__)

__all__ = ["Limits", "ModelState", "ModelStore", "VariableSpec", "make_optimizer"]

DEFAULT_LIMITS = Limits()
T = TypeVar("T")


def _host_copy(value: Any) -> np.ndarray:
    """One copy of a device or host array, on the host."""
    host = optim_core.to_numpy(value)
    return np.array(host, copy=True) if host is value else host


@dataclass(frozen=True)
class CreateOutcome:
    """``created``: a new model; ``values_match``: its weights equal the values sent."""

    created: bool
    values_match: bool


class ModelStore:
    """Holds one model (a shard): its variables on ``device`` and its optimizer."""

    def __init__(
        self, *, device: str = "cpu", nonfinite: str = "reject", limits: Limits = DEFAULT_LIMITS
    ) -> None:
        check_choice("nonfinite", nonfinite, gradients.NONFINITE_POLICIES)
        self.device: str = optim_core.resolve_device(device)
        self.nonfinite = nonfinite
        self.limits = limits
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        # Bumped by every apply, the one change of a model's weights in place (read under
        # the lock: equal values mean the same weights, for the same model).
        self.weight_writes = 0
        self._model: Model | None = None
        self._generation = 0
        self._closed = False
        # Called under the lock before every change of the model, with the new model (None:
        # deleted) and the reason ("created", "deleted", "restored"); if it raises, the model
        # is not changed. The daemon records there which model its checkpoint directory
        # serves (see checkpoint_dir.py).
        self.on_model_change: Callable[[Model | None, str], None] | None = None

    # --- properties ----------------------------------------------------------------------
    @property
    def has_model(self) -> bool:
        with self.lock:
            return self._model is not None

    @property
    def model_name(self) -> str:
        with self.lock:
            return self._model.name if self._model is not None else ""

    @property
    def version(self) -> int:
        """Completed optimizer steps (``optimizer.iterations``); 0 without a model."""
        with self.lock:
            return self._model.optimizer.iterations if self._model is not None else 0

    @property
    def generation(self) -> int:
        """Bumped whenever the model is created, deleted or replaced (not on updates)."""
        with self.lock:
            return self._generation

    @property
    def closed(self) -> bool:
        with self.lock:
            return self._closed

    def _require_model(self) -> Model:
        if self._model is None:
            raise NotFound("no model exists on this server; create one first", reason="NO_MODEL")
        return self._model

    def _install(self, model: Model | None, reason: str) -> None:
        with self.lock:
            if self.on_model_change is not None:
                self.on_model_change(model, reason)
            self._model = model
            self._generation += 1
            self.changed.notify_all()

    # --- creating and replacing the model ------------------------------------------------
    def create_model(
        self, name: str, optimizer: dict[str, Any] | str, variables: dict[str, np.ndarray]
    ) -> CreateOutcome:
        """Create the model, or find an identical definition (an idempotent retry).

        Identical means the same model name, variable names, dtypes and shapes in order,
        and the same optimizer config. The outcome says whether it was created, and whether
        the model's weights now equal ``variables`` (False when it already existed with
        other values: the caller must pull before computing gradients).
        """
        check_name("the model name", name, allow_empty=True)
        arrays = check_variables(variables, self.limits)
        candidate = make_optimizer(optimizer)
        config = config_json(optim_core.serialize(candidate))
        specs = [VariableSpec(n, v.dtype.name, tuple(int(d) for d in v.shape)) for n, v in arrays]

        def existing() -> CreateOutcome | None:
            model = self._model
            if model is None:
                return None
            same = model.name == name and specs_of(model) == specs
            if same and (config in model.definitions or config == current_config(model)):
                equal = all(
                    np.array_equal(optim_core.to_numpy(model.variables[n].value), v)
                    for n, v in arrays
                )
                return CreateOutcome(created=False, values_match=equal)
            raise AlreadyExists(
                f"a model already exists with another definition: "
                f"{describe_difference(model, name, specs, config)}",
                metadata={"model_name": model.name},
            )

        with self.lock:
            found = existing()
            if found is not None:
                return found
        model = build_model(name, candidate, arrays, device=self.device, limits=self.limits)
        with self.lock:
            found = existing()  # created concurrently while we were building
            if found is not None:
                return found
            self._install(model, "created")
        logger.info(
            "created model %r: %d variables, %s", name, len(arrays), type(candidate).__name__
        )
        return CreateOutcome(created=True, values_match=True)

    def delete_model(self) -> None:
        """Drop the model and its optimizer state; NotFound when there is none."""
        with self.lock:
            self._require_model()
            self._install(None, "deleted")

    def import_state(self, state: ModelState) -> None:
        """Replace the model with ``state``; everything is built and checked before the swap."""
        if not isinstance(state, ModelState):
            raise InvalidArgument(f"expected a ModelState; got {type(state).__name__}")
        check_name("the model name", state.model_name, allow_empty=True)
        optimizer = make_optimizer(state.optimizer)
        arrays = check_variables(state.variables, self.limits)
        if not isinstance(state.optimizer_state, Mapping):
            raise InvalidArgument("the optimizer state must be a mapping of names to arrays")
        model = build_model(
            state.model_name, optimizer, arrays, device=self.device, limits=self.limits
        )
        try:
            model.optimizer.load_state_dict(dict(state.optimizer_state))
        except ValueError as exc:
            raise InvalidArgument(f"the optimizer state does not fit the model: {exc}") from exc
        if model.optimizer.iterations != state.version:
            raise InvalidArgument(
                f"the state says version {state.version}, but its optimizer state has "
                f"{model.optimizer.iterations} iterations"
            )
        self._install(model, "restored")
        logger.info("imported model %r at version %d", state.model_name, state.version)

    def export_state(self) -> ModelState:
        """A consistent host copy of the whole model (variables, optimizer state, version)."""
        with self.lock:
            model = self._require_model()
            opt = model.optimizer
            return ModelState(
                model_name=model.name,
                optimizer=optim_core.serialize(opt),
                variables={n: _host_copy(v.value) for n, v in model.variables.items()},
                optimizer_state=opt.state_dict(),
                version=opt.iterations,
            )

    # --- description and hyperparameters -------------------------------------------------
    def specs(self) -> list[VariableSpec]:
        with self.lock:
            return specs_of(self._require_model())

    def optimizer_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Names, dtype names and shapes of the optimizer state (computed once per optimizer)."""
        with self.lock:
            return optimizer_specs_of(self._require_model())

    def optimizer_config(self) -> dict[str, Any]:
        with self.lock:
            return optim_core.serialize(self._require_model().optimizer)

    def hyperparameters(self) -> dict[str, float]:
        """The current learning rate and every float-valued optimizer config entry."""
        with self.lock:
            return hyperparameters_of(self._require_model().optimizer)

    def set_hyperparameters(self, values: dict[str, float]) -> dict[str, float]:
        """Change hyperparameters live; all are validated before any changes."""
        with self.lock:
            model = self._require_model()
            edit_hyperparameters(model, values)
            self.changed.notify_all()
            logger.info("hyperparameters changed: %s", values)
            return hyperparameters_of(model.optimizer)

    # --- gradients -----------------------------------------------------------------------
    def validate_push(self, grads: dict[str, np.ndarray | SparseRows]) -> dict[str, Any] | None:
        """Check every gradient against its variable; None when ``skip`` drops the push.

        Runs outside the lock on a snapshot of the specs (the aggregator re-checks
        ``generation`` before applying), so large pushes are checked in parallel.
        """
        with self.lock:
            model = self._require_model()
            specs, slabs = model.specs, model.slabs
        if slabs and getattr(grads, "packed", None):
            # Slabs the push carries whole are checked in bulk (one pass each).
            return gradients.check_slab_push(
                grads,
                slabs,
                specs,
                nonfinite=self.nonfinite,
                device=self.device,
                max_tensor_bytes=self.limits.max_tensor_bytes,
            )
        return gradients.check_push(
            grads,
            specs,
            nonfinite=self.nonfinite,
            device=self.device,
            max_tensor_bytes=self.limits.max_tensor_bytes,
        )

    def combine(
        self, pushes: list[dict[str, Any]], *, reduction: str, scale: float = 1.0
    ) -> dict[str, Any]:
        """Reduce prepared pushes in list order (see ``gradients.combine``)."""
        with self.lock:
            specs = self._require_model().specs
        return gradients.combine(
            pushes, specs, reduction=reduction, scale=scale, device=self.device
        )

    def apply(self, grads: dict[str, Any]) -> int:
        """One optimizer step on the variables in ``grads``; returns the new version."""
        with self.lock:
            model = self._require_model()
            slabs = getattr(grads, "slabs", None) or {}
            if grads or slabs:
                names = list(grads)
                # A slab with one flat gradient is updated whole where the optimizer's rule
                # is element-wise, else variable by variable (optim_core decides).
                model.optimizer.apply(
                    [*slabs.values(), *(grads[n] for n in names)],
                    [*slabs, *(model.variables[n] for n in names)],
                )
                self.weight_writes += 1
                self.changed.notify_all()
            return model.optimizer.iterations

    # --- reading -------------------------------------------------------------------------
    def read(
        self, names: list[str] | None = None, rows: dict[str, np.ndarray] | None = None
    ) -> tuple[int, dict[str, np.ndarray | SparseRows]]:
        """Host copies at one version: ``names`` (all when None) plus the ``rows`` selections.

        With ``names=None`` and ``rows`` given, only the row-selected variables are read.
        """
        live = self.device == "cpu"  # on a GPU, read_with hands out host copies already

        def copies(tensors: dict[str, np.ndarray | SparseRows]) -> dict[str, Any]:
            return {
                n: np.array(v, copy=True) if live and isinstance(v, np.ndarray) else v
                for n, v in tensors.items()
            }

        return self.read_with(copies, names, rows)

    def read_with(
        self,
        use: Callable[[dict[str, np.ndarray | SparseRows]], T],
        names: list[str] | None = None,
        rows: dict[str, np.ndarray] | None = None,
    ) -> tuple[int, T]:
        """Like :meth:`read`, but ``use`` gets the live host arrays, under the lock.

        ``use`` must copy whatever it keeps (e.g. encode the arrays into messages) and
        change nothing; its result is returned with the version. This saves the copy
        :meth:`read` makes of every tensor. Row selections and device (GPU) variables
        arrive as host copies, which ``use`` may keep.
        """
        with self.lock:
            model = self._require_model()
            if names is None and not rows and self.device == "cpu":
                # Every variable, whole, in model order: the live host arrays (one mapping
                # per model), with the slabs' stretches (see Weights).
                return model.optimizer.iterations, use(_whole_model(model))
            wanted, selections = _selection(model, names, rows)
            tensors: dict[str, np.ndarray | SparseRows] = {}
            xp = optim_core.array_module(self.device)
            if xp is np and not selections:  # host arrays, whole: the live values themselves
                variables = model.variables
                tensors = {name: variables[name].value for name in wanted}
                return model.optimizer.iterations, use(tensors)
            for name in wanted:
                value = model.variables[name].value
                if name in selections:
                    idx = selections[name]
                    gathered = value[idx if xp is np else xp.asarray(idx)]
                    host = optim_core.to_numpy(gathered)
                    tensors[name] = SparseRows(indices=idx, values=host)
                else:
                    tensors[name] = optim_core.to_numpy(value)
            return model.optimizer.iterations, use(tensors)

    def read_sizes(
        self, names: list[str] | None = None, rows: dict[str, np.ndarray] | None = None
    ) -> dict[str, tuple[int, int]]:
        """``{name: (payload bytes, rank)}`` of what :meth:`read` would return, in its order.

        Raises what ``read`` would for a bad selection, without copying anything, so a
        combined push-and-read (the Step RPC) can refuse it before the push changes state.
        """
        with self.lock:
            model = self._require_model()
            wanted, selections = _selection(model, names, rows)
            out = {}
            for name in wanted:
                dtype, shape = model.specs[name]
                rows = len(selections[name]) if name in selections else None
                out[name] = (payload_bytes(dtype.itemsize, shape, rows), len(shape))
            return out

    def wait_for_version(self, min_version: int, timeout_s: float | None) -> int:
        """Block until ``version >= min_version``; DeadlineExceeded, or Unavailable if closed."""
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        with self.changed:
            while True:
                version = self._model.optimizer.iterations if self._model is not None else 0
                if version >= min_version:
                    return version
                if self._closed:
                    raise Unavailable("the server is shutting down")
                if deadline is None:
                    self.changed.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"version {min_version} was not reached within {timeout_s:g} s "
                        f"(the model is at version {version})"
                    )
                self.changed.wait(remaining)

    # --- optimizer state -----------------------------------------------------------------
    def optimizer_state(self) -> tuple[int, list[tuple[str, np.ndarray]]]:
        """``state_dict()`` host copies in ``optimizer.variables`` order, with the version."""
        with self.lock:
            opt = self._require_model().optimizer
            return opt.iterations, list(opt.state_dict().items())

    def set_optimizer_state(self, arrays: dict[str, np.ndarray]) -> int:
        """Replace every optimizer variable (validated first); returns the version."""
        if not isinstance(arrays, Mapping):
            raise InvalidArgument("the optimizer state must be a mapping of names to arrays")
        for key, value in arrays.items():
            if not isinstance(value, np.ndarray):
                raise InvalidArgument(
                    f"optimizer state {key!r} must be a NumPy array; got {type(value).__name__}"
                )
            _check_state_entry(key, value)
        with self.lock:
            opt = self._require_model().optimizer
            try:
                opt.load_state_dict(dict(arrays))
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
            self.changed.notify_all()
            return opt.iterations

    def close(self) -> None:
        """Wake every waiter; later waits raise Unavailable."""
        with self.lock:
            self._closed = True
            self.changed.notify_all()


class Weights(dict):
    """Every variable's live host array by name, in model order (``whole``); ``runs``: where
    consecutive ones are one flat array end to end in a slab, as ``(first, end, flat, byte
    starts)`` (see ``paramserve.wire``'s ``encoded_chunk_items``), so a reply sends each
    stretch as one piece. Read-only for its users: one mapping serves every read of a
    model."""

    whole = True
    runs: list[tuple[int, int, np.ndarray, list[int]]] = []


def _whole_model(model: Model) -> Weights:
    """``model``'s :class:`Weights` (built once per model: the arrays are live views)."""
    if model.weights is None:
        weights = Weights({name: v.value for name, v in model.variables.items()})
        weights.runs = _weight_runs(model)
        model.weights = weights
    return model.weights


def _weight_runs(model: Model) -> list[tuple[int, int, np.ndarray, list[int]]]:
    """The stretches of ``model``'s variables (in model order) that lie end to end in one
    slab; computed once per model."""
    if model.weight_runs is not None:
        return model.weight_runs
    runs = []
    positions = {
        id(v): (slab, k) for slab in model.slabs.values() for k, v in enumerate(slab.variables)
    }
    members = [positions.get(id(v)) for v in model.variables.values()]
    i = 0
    while i < len(members):
        if members[i] is None:
            i += 1
            continue
        slab, k0 = members[i]
        j = i + 1
        while j < len(members) and members[j] == (slab, k0 + j - i):
            j += 1
        if j - i > 1:
            itemsize = slab.dtype.itemsize
            offsets = slab.offsets[k0 : k0 + j - i]
            end = slab.offsets[k0 + j - i - 1] + slab.sizes[k0 + j - i - 1]
            starts = [(o - offsets[0]) * itemsize for o in offsets]
            starts.append((end - offsets[0]) * itemsize)
            runs.append((i, j, slab.buffer[offsets[0] : end], starts))
        i = j
    model.weight_runs = runs
    return runs


def _selection(
    model: Model, names: list[str] | None, rows: dict[str, np.ndarray] | None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The variables a read returns, in order, and its checked row selections."""
    rows = dict(rows or {})
    if names is None:
        wanted = [] if rows else list(model.variables)
    else:
        wanted = list(dict.fromkeys(names))
    wanted += [n for n in rows if n not in wanted]
    unknown = [n for n in wanted if n not in model.variables]
    if unknown:
        raise NotFound(
            f"unknown variable(s) {unknown[:10]}; the model has {len(model.variables)} variables",
            reason="UNKNOWN_VARIABLE",
            metadata={"variable": unknown[0]},
        )
    return wanted, {n: _check_rows(n, idx, model.specs[n][1]) for n, idx in rows.items()}


def _check_state_entry(key: str, value: np.ndarray) -> None:
    """Step counters stay in [0, max) (the version is >= 0 and can take one more step) and
    learning rates are finite, as SetHyperparameters requires."""
    if value.dtype.kind in "iu" and value.size:
        high = np.iinfo(value.dtype).max
        if int(value.min()) < 0 or int(value.max()) >= high:
            raise InvalidArgument(
                f"optimizer state {key!r} is a step counter and must be in [0, {high}); "
                f"got {value.min()}..{value.max()}"
            )
    if key.rsplit("/", 1)[-1] == "learning_rate" and not np.isfinite(value).all():
        raise InvalidArgument(f"optimizer state {key!r} must be finite; got {value}")


def _check_rows(name: str, rows: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not shape:
        raise InvalidArgument(
            f"rows were requested of {name!r}, but it is a scalar",
            metadata={"variable": name},
            violations=[(f"rows[{name}]", "the variable is a scalar")],
        )
    idx = np.asarray(rows)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise InvalidArgument(
            f"rows of {name!r} must be a 1-D list of integers; got dtype {idx.dtype.name} "
            f"with shape {tuple(idx.shape)}",
            metadata={"variable": name},
            violations=[(f"rows[{name}]", "must be a 1-D list of integers")],
        )
    idx = idx.astype(np.int64, copy=True)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= shape[0]):
        raise InvalidArgument(
            f"rows of {name!r} must be in [0, {shape[0]}); got rows in "
            f"[{int(idx.min())}, {int(idx.max())}]",
            metadata={"variable": name},
            violations=[(f"rows[{name}]", f"must be in [0, {shape[0]})")],
        )
    return idx
