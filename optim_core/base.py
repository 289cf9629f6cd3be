"""The optimizer base class: everything shared by all optimizers, exactly as Keras 3 does it.

Owns the step counter, the learning rate (float, schedule or callable), clipping,
decoupled weight decay, EMA, gradient accumulation, the static loss scale, None and
sparse gradients, variable/slot bookkeeping, weights and configs. Subclasses only
create their slots in ``build`` and write their rule in ``update_step``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from . import backend, fused, fused_gpu
from .backend import get_array_module, to_numpy
from .schedules import LearningRateSchedule
from .schedules import deserialize as deserialize_schedule
from .schedules import serialize as serialize_schedule
from .slabs import Slab
from .variables import IndexedSlices, Variable, check_float_dtype, densify

BASE_CONFIG_KEYS = (
    "name",
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "global_clipnorm",
    "clipvalue",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


def snake_case(class_name: str) -> str:
    """Keras's default optimizer name: ``AdamW`` -> ``adam_w``, ``RMSprop`` -> ``rm_sprop``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


class Optimizer:
    """Base class of all optimizers; subclass it as in Keras 3 (build/update_step/get_config).

    Variables are :class:`Variable` objects or plain arrays (NumPy or CuPy) updated in
    place. Gradients are arrays of the same shape, ``None`` to skip a variable, or
    ``(indices, values)`` / :class:`IndexedSlices` row gradients.
    """

    # Run the fused kernels where they apply (numba on NumPy arrays: fused.can_fuse; CUDA on
    # CuPy arrays: fused_gpu.can_fuse); False always runs the xp rule. Not part of the config:
    # tests and benchmarks compare the two on one instance.
    use_fused_kernels: bool = True
    # True when each element's update reads only that element's gradient and slots and
    # step-wide scalars (learning rate, step count): a variable may then be split by rows
    # across shards with results identical to one server. A rule reading a whole variable
    # (a norm, a matrix product, factored statistics) leaves it False.
    rows_separable: bool = False
    # Set (in its own body) by a class whose update_step is element-wise: every element goes
    # through the same operations with per-step scalars that depend on the dtype only, and
    # its slots come from add_optimizer_variables. Such an optimizer updates a whole slab of
    # variables in one call (see slabs.py); the others (per-tensor norms, factored or
    # matrix statistics) always go variable by variable.
    elementwise_update: bool = False
    # False: never update slabs whole (tests compare the two paths on one instance).
    use_slabs: bool = True

    def __init__(
        self,
        learning_rate: float | LearningRateSchedule | Callable[[], float],
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("decay", None) is not None:
            warnings.warn(
                "Argument `decay` is no longer supported and will be ignored.", stacklevel=2
            )
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        if gradient_accumulation_steps and not gradient_accumulation_steps >= 2:
            raise ValueError(
                "`gradient_accumulation_steps` must be an integer >= 2. "
                f"Received: gradient_accumulation_steps={gradient_accumulation_steps}"
            )
        if use_ema:
            if ema_momentum > 1 or ema_momentum < 0:
                raise ValueError(
                    "`ema_momentum` must be in the range [0, 1]. "
                    f"Received: ema_momentum={ema_momentum}"
                )
            if ema_overwrite_frequency is not None and (
                not isinstance(ema_overwrite_frequency, int)
                or isinstance(ema_overwrite_frequency, bool)
                or ema_overwrite_frequency < 1
            ):
                # Keras also accepts 0 here, with backend-dependent meaning; we refuse it.
                raise ValueError(
                    "`ema_overwrite_frequency` must be an integer >= 1 or None. "
                    f"Received: ema_overwrite_frequency={ema_overwrite_frequency}"
                )
        if sum(a is not None for a in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: clipnorm={clipnorm}, clipvalue={clipvalue}, "
                f"global_clipnorm={global_clipnorm}"
            )
        self.name = name if name is not None else snake_case(type(self).__name__)
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.global_clipnorm = global_clipnorm
        self.clipvalue = clipvalue
        self.use_ema = use_ema
        self.ema_momentum = ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = gradient_accumulation_steps

        self.built = False
        self._variables: list[Variable] = []
        self._trainable_variables: list[Variable] = []
        self._index_by_key: dict[int, int] = {}
        self._exclude_ids: set[int] = set()
        self._exclude_vars: list[Any] = []  # what var_list held (to name it in a config)
        self._exclude_paths: set[str] = set()
        self._exclude_names: list[str] = []
        self._exclude_pattern: re.Pattern[str] | None = None
        self._model_variables_moving_average: list[Variable] = []
        self._accumulated_gradients: list[Variable] = []
        # id(slot) -> path of the model variable it belongs to (see state_owners).
        self._slot_owners: dict[int, str] = {}
        # Slabs updated whole: id(slab) -> (slab, the Variable standing for it). Its index
        # (after the real variables') picks its slot slabs out of every slot list.
        self._slabs: dict[int, tuple[Slab, Variable]] = {}
        self._slab_decay: dict[int, bool | None] = {}

        self._iterations = self.add_variable((), dtype="int32", name="iteration")
        if isinstance(learning_rate, LearningRateSchedule) or callable(learning_rate):
            self._learning_rate: Any = learning_rate
        else:
            if not isinstance(learning_rate, float):
                raise ValueError(
                    "Argument `learning_rate` should be float, or an instance of "
                    "LearningRateSchedule, or a callable that takes no arguments and "
                    f"returns the learning rate. Received instead: learning_rate={learning_rate!r}"
                )
            self._learning_rate = self.add_variable((), dtype="float32", name="learning_rate")
            self._learning_rate.assign(learning_rate)

    # --- state variables ---------------------------------------------------------------
    def add_variable(
        self,
        shape: Sequence[int],
        initializer: str | float = "zeros",
        dtype: Any = None,
        name: str | None = None,
        *,
        xp: Any = np,
        owner: Variable | str | None = None,
    ) -> Variable:
        """Create and track an optimizer variable (in creation order, as Keras lists them).

        ``owner`` (an extension of Keras's API): the model variable (or its path) the slot
        belongs to, for :meth:`state_owners`; None for state of the whole step.
        """
        dtype = np.dtype(dtype if dtype is not None else "float32")
        value = backend.zeros(tuple(shape), dtype, xp)
        if initializer == "ones":
            value[...] = 1
        elif not isinstance(initializer, str):
            value[...] = initializer
        elif initializer != "zeros":
            raise ValueError(
                f"Unknown initializer {initializer!r}: use 'zeros', 'ones' or a number"
            )
        name = name or "variable"
        var = Variable(value, name=name, path=f"{self.name}/{name}")
        self._variables.append(var)
        if owner is not None:
            self._slot_owners[id(var)] = owner.path if isinstance(owner, Variable) else owner
        return var

    def add_variable_from_reference(
        self, reference_variable: Variable, name: str, initializer: str | float = "zeros"
    ) -> Variable:
        """Create a slot shaped like ``reference_variable``, named ``{path}_{name}`` as in Keras."""
        prefix = reference_variable.path.replace("/", "_")
        return self.add_variable(
            reference_variable.shape,
            initializer=initializer,
            dtype=reference_variable.dtype,
            name=f"{prefix}_{name}",
            xp=reference_variable.xp,
            owner=reference_variable,
        )

    def add_optimizer_variables(
        self,
        trainable_variables: Sequence[Variable],
        name: str | Sequence[str],
        initializer: str | float = "zeros",
    ) -> Any:
        """Create one slot (or one of each named kind) per variable, interleaved per variable.

        The slots of variables in a slab updated whole are views of one slot slab per kind,
        which the slab's stand-in gets (listed after the real variables' slots, never in
        :attr:`variables`).
        """
        names = [name] if isinstance(name, str) else list(name)
        created: list[list[Variable]] = [[] for _ in names]
        slot_slabs: dict[tuple[int, int], Any] = {}
        if self._slabs and trainable_variables is self._trainable_variables:
            for key, (slab, _) in self._slabs.items():
                for i in range(len(names)):
                    slot_slabs[key, i] = self._slot_buffer(slab, initializer)
        for var in trainable_variables:
            slab = self._slab_of(var) if slot_slabs else None
            for i, n in enumerate(names):
                if slab is None:
                    created[i].append(self.add_variable_from_reference(var, n, initializer))
                    continue
                k = self._slab_position(slab, var)
                offset, size = slab.offsets[k], slab.sizes[k]
                value = slot_slabs[id(slab), i][offset : offset + size].reshape(var.shape)
                slot_name = f"{var.path.replace('/', '_')}_{n}"
                slot = Variable(value, name=slot_name, path=f"{self.name}/{slot_name}")
                self._variables.append(slot)
                self._slot_owners[id(slot)] = var.path
                created[i].append(slot)
        for (key, i), buffer in slot_slabs.items():
            stand_in = self._slabs[key][1]
            created[i].append(Variable(buffer, path=f"{stand_in.path}_{names[i]}"))
        return created[0] if isinstance(name, str) else tuple(created)

    @staticmethod
    def _slot_buffer(slab: Slab, initializer: str | float) -> Any:
        """A flat slot slab for ``slab``, filled as ``add_variable`` fills a slot."""
        xp = get_array_module(slab.buffer)
        buffer = backend.zeros(slab.buffer.shape, slab.dtype, xp)
        if initializer == "ones":
            buffer[...] = 1
        elif not isinstance(initializer, str):
            buffer[...] = initializer
        elif initializer != "zeros":
            raise ValueError(
                f"Unknown initializer {initializer!r}: use 'zeros', 'ones' or a number"
            )
        return buffer

    def _slab_position(self, slab: Slab, var: Variable) -> int:
        positions = self.__dict__.setdefault("_slab_positions", {})
        table = positions.get(id(slab))
        if table is None:
            table = positions[id(slab)] = {id(v): k for k, v in enumerate(slab.variables)}
        return table[id(var)]

    @property
    def variables(self) -> list[Variable]:
        """All optimizer variables in Keras 3 creation order (iteration first)."""
        return list(self._variables)

    @property
    def iterations(self) -> int:
        """Completed optimizer steps: raw calls, or full accumulation cycles."""
        n = int(self._iterations.value)
        if self.gradient_accumulation_steps:
            return n // self.gradient_accumulation_steps
        return n

    @iterations.setter
    def iterations(self, value: int) -> None:
        self._iterations.assign(int(value))

    # --- learning rate -----------------------------------------------------------------
    def _get_current_learning_rate(self) -> np.floating:
        lr = self._learning_rate
        if isinstance(lr, Variable):
            return lr.value[()]
        if isinstance(lr, LearningRateSchedule):
            return lr(int(self._iterations.value))
        return np.float32(lr())

    @property
    def learning_rate(self) -> np.floating:
        """The learning rate for the current step (float32)."""
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if isinstance(value, LearningRateSchedule) or callable(value):
            if isinstance(self._learning_rate, Variable):
                self._variables.remove(self._learning_rate)
            self._learning_rate = value
            return
        if not isinstance(self._learning_rate, Variable):
            raise TypeError(
                "This optimizer was created with a learning rate schedule or callable, so "
                "its learning rate is not settable to a number. Set a new schedule instead."
            )
        self._learning_rate.assign(value)

    # --- building ----------------------------------------------------------------------
    def _key(self, variable: Any) -> int:
        return id(variable.value) if isinstance(variable, Variable) else id(variable)

    def _as_variables(self, variables: Iterable[Any]) -> list[Variable]:
        out = []
        for i, v in enumerate(variables):
            if isinstance(v, Variable):
                out.append(v)
            else:
                name = "variable" if i == 0 else f"variable_{i}"
                out.append(Variable(v, name=name))
        return out

    def build(self, variables: Iterable[Any] | dict[str, Any]) -> None:
        """Create all slots for ``variables`` (Variables, arrays, or a ``{path: array}`` dict)."""
        if self.built:
            return
        if isinstance(variables, dict):
            var_list = [
                v if isinstance(v, Variable) else Variable(v, path=k) for k, v in variables.items()
            ]
        else:
            var_list = self._as_variables(variables)
        for v in var_list:
            check_float_dtype(v.dtype, f"Variable {v.path!r}")
        self._trainable_variables = list(var_list)
        self._index_by_key = {self._key(v): i for i, v in enumerate(var_list)}
        self._slabs = {}
        if self._slab_rule():
            self._register_slabs(var_list)
        if self.use_ema:
            self._model_variables_moving_average = self.add_optimizer_variables(
                self._trainable_variables, "average"
            )
        if self.gradient_accumulation_steps:
            self._accumulated_gradients = self.add_optimizer_variables(
                self._trainable_variables, "gradient_accumulator"
            )
        self.built = True

    # --- slabs -------------------------------------------------------------------------
    def _slab_rule(self) -> bool:
        """Whether this optimizer's rule may run on a whole slab at once (see
        ``elementwise_update``): the class defining ``update_step`` declares it, every
        override of the per-step loop comes from such a class, and no per-tensor clipping
        (``clipnorm``, ``global_clipnorm``) is set."""
        if not self.use_slabs:
            return False
        if (self.clipnorm and self.clipnorm > 0) or (
            self.global_clipnorm and self.global_clipnorm > 0
        ):
            return False
        for method in ("update_step", "_backend_update_step", "apply", "_apply_prepared"):
            owner = next(c for c in type(self).__mro__ if method in c.__dict__)
            if owner is Optimizer and method != "update_step":
                continue
            if not owner.__dict__.get("elementwise_update", False):
                return False
        return True

    def _register_slabs(self, var_list: list[Variable]) -> None:
        """Take every slab whose variables are all among ``var_list``, in the slab's order."""
        index = {id(v): i for i, v in enumerate(var_list)}
        for var in var_list:
            slab = var.slab
            if slab is None or id(slab) in self._slabs:
                continue
            positions = [index.get(id(v)) for v in slab.variables]
            if None in positions:
                continue
            stand_in = Variable(slab.buffer, path=f"{self.name}/slab_{len(self._slabs)}")
            stand_in.slab = slab
            self._index_by_key[self._key(stand_in)] = len(var_list) + len(self._slabs)
            self._slabs[id(slab)] = (slab, stand_in)

    def _slab_of(self, variable: Variable) -> Slab | None:
        """The slab updated whole that ``variable`` belongs to, if any."""
        slab = variable.slab
        return slab if slab is not None and id(slab) in self._slabs else None

    def _stand_in_slab(self, variable: Variable) -> Slab | None:
        """The slab ``variable`` stands in for (None for a real variable)."""
        slab = variable.slab
        if slab is None or variable.value is not slab.buffer:
            return None
        return slab

    def _units(self) -> list[tuple[Variable, int]]:
        """Every trainable variable once, as ``(variable or slab stand-in, its index)``:
        the slabs updated whole, then the variables outside them (kept once built)."""
        cached = self.__dict__.get("_units_cache")
        if cached is not None and cached[0] == len(self._slabs):
            return cached[1]
        n = len(self._trainable_variables)
        units = [(stand_in, n + k) for k, (_, stand_in) in enumerate(self._slabs.values())]
        units += [
            (v, i) for i, v in enumerate(self._trainable_variables) if self._slab_of(v) is None
        ]
        self.__dict__["_units_cache"] = (len(self._slabs), units)
        return units

    def _get_variable_index(self, variable: Any) -> int:
        return self._index_by_key[self._key(variable)]

    @property
    def trainable_variables(self) -> list[Variable]:
        """The model variables this optimizer was built with, in build order."""
        return list(self._trainable_variables)

    def _slab_entries(self, grads: list[Any], variables: list[Any]) -> tuple[list, list]:
        """Slabs in ``variables`` (each with one flat gradient laid out like it) as their
        stand-ins when this optimizer updates them whole, else as their variables, each with
        its view of the flat gradient (the same update, variable by variable)."""
        out_grads: list[Any] = []
        out_vars: list[Any] = []
        whole = self.built and self._slab_rule()
        for g, v in zip(grads, variables, strict=True):
            if type(v) is not Slab:
                out_grads.append(g)
                out_vars.append(v)
                continue
            entry = self._slabs.get(id(v)) if whole else None
            if g is None:
                out_grads += [None] * len(v.variables)
                out_vars += v.variables
                continue
            if tuple(np.shape(g)) != (v.size,):
                raise ValueError(
                    f"The gradient for a slab of {len(v.variables)} variables must be flat, "
                    f"of shape ({v.size},). Received: shape={tuple(np.shape(g))}"
                )
            if entry is not None:
                out_grads.append(g)
                out_vars.append(entry[1])
            else:
                out_grads += v.views(g)
                out_vars += v.variables
        return out_grads, out_vars

    def _resolve(self, variables: Iterable[Any]) -> list[Variable]:
        n = len(self._trainable_variables)
        out = []
        for v in variables:
            idx = self._index_by_key.get(self._key(v))
            if idx is None:
                label = v.path if isinstance(v, Variable) else f"array of shape {np.shape(v)}"
                raise ValueError(
                    f"Unknown variable: {label}. This optimizer can only be called for the "
                    "variables it was originally built with."
                )
            out.append(self._trainable_variables[idx] if idx < n else v)  # v: a slab stand-in
        return out

    # --- applying gradients ------------------------------------------------------------
    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> Variable:
        """Keras's ``apply_gradients(zip(grads, vars))``; returns the iteration variable."""
        grads, variables = zip(*grads_and_vars, strict=True)
        self.apply(list(grads), list(variables))
        return self._iterations

    def apply(self, grads: Sequence[Any], trainable_variables: Iterable[Any] | None = None) -> None:
        """Update ``trainable_variables`` in place from ``grads`` (Keras 3 ``apply``)."""
        grads = list(grads)
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built on a list of variables. Call `optimizer.build(variables)` first."
                )
            if len(grads) != len(self._trainable_variables):
                raise ValueError(
                    "When passing `grads` without `variables`, they must match the built "
                    f"variables one to one. Received {len(grads)} gradients for "
                    f"{len(self._trainable_variables)} variables."
                )
            variables = list(self._trainable_variables)
        else:
            variables = list(trainable_variables)
            if len(variables) != len(grads):
                raise ValueError(
                    f"Got {len(grads)} gradients for {len(variables)} variables; "
                    "they must be paired one to one."
                )
            if any(type(v) is Slab for v in variables):
                grads, variables = self._slab_entries(grads, variables)
            if not self.built:
                self.build(variables)
            variables = self._resolve(variables)

        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        if not pairs:
            raise ValueError("No gradients provided for any variable.")
        if len(pairs) < len(grads):
            missing = [v.path for g, v in zip(grads, variables, strict=True) if g is None]
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss.",
                stacklevel=2,
            )
        grads = [self._prepare_gradient(g, v) for g, v in pairs]
        variables = [v for _, v in pairs]
        self._apply_prepared(grads, variables)

    def _prepare_gradient(self, grad: Any, variable: Variable) -> Any:
        """Check one gradient against its variable; return it as a dense array of its dtype."""
        value = variable.value
        if not (isinstance(grad, np.ndarray) and isinstance(value, np.ndarray)):
            # Host arrays on a host variable (the common case) need none of this.
            if isinstance(grad, IndexedSlices | tuple):
                return densify(grad, variable)
            xp = variable.xp
            if get_array_module(grad) is not xp or not hasattr(grad, "dtype"):
                grad = np.asarray(to_numpy(grad)) if xp is np else xp.asarray(grad)
        if tuple(grad.shape) != tuple(value.shape):
            raise ValueError(
                f"Gradient for variable {variable.path!r} has shape {tuple(grad.shape)}, "
                f"expected {variable.shape}."
            )
        if grad.dtype != value.dtype:
            grad = grad.astype(value.dtype)
        return grad

    def _apply_prepared(self, grads: list[Any], variables: list[Variable]) -> None:
        """Steps 5-9 of Keras's ``apply`` on validated dense gradients."""
        if self.loss_scale_factor is not None:
            grads = [g / g.dtype.type(self.loss_scale_factor) for g in grads]
        n = int(self._iterations.value)
        steps = self.gradient_accumulation_steps
        if steps:
            accs = [self._accumulated_gradients[self._get_variable_index(v)] for v in variables]
            if (n + 1) % steps == 0:
                grads = [
                    (g + a.value) / g.dtype.type(steps) for g, a in zip(grads, accs, strict=True)
                ]
                grads = self._clip_gradients(grads)
                self._apply_weight_decay(variables)
                self._backend_update_step(grads, variables, self.learning_rate)
                for acc in self._accumulated_gradients:
                    acc.value[...] = 0
            else:
                for g, a in zip(grads, accs, strict=True):
                    a.assign(g + a.value)
        else:
            grads = self._clip_gradients(grads)
            self._apply_weight_decay(variables)
            self._backend_update_step(grads, variables, self.learning_rate)
        if self.use_ema:
            self._update_moving_averages()
            f = self.ema_overwrite_frequency
            if f and (self.iterations + 1) % f == 0:
                self._overwrite_with_averages()
        self._iterations.assign(n + 1)

    def _backend_update_step(
        self, grads: list[Any], variables: list[Variable], learning_rate: Any
    ) -> None:
        """Run ``update_step`` for each pair; optimizers with per-step state override this."""
        for g, v in zip(grads, variables, strict=True):
            self.update_step(g, v, learning_rate)

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        """The per-variable update rule; every optimizer implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_step()")

    def assign(self, variable: Variable, value: Any) -> None:
        variable.assign(value)

    def assign_add(self, variable: Variable, value: Any) -> None:
        variable.assign_add(value)

    def assign_sub(self, variable: Variable, value: Any) -> None:
        variable.assign_sub(value)

    # --- spreading one model over several shards -----------------------------------------
    def splits_rows(self) -> bool:
        """Whether a variable may be split by rows across shards without changing results.

        True for a :attr:`rows_separable` rule without ``clipnorm`` (a norm of the whole
        variable's gradient).
        """
        return self.rows_separable and not self.clipnorm

    def cross_variable_options(self) -> list[str]:
        """The options of this optimizer that read every variable at once.

        A job whose variables live on several shards cannot apply them shard by shard: the
        sharded client refuses them, naming each.
        """
        if self.global_clipnorm:
            return [f"global_clipnorm={self.global_clipnorm} (the norm of all gradients)"]
        return []

    # --- clipping, weight decay, EMA ---------------------------------------------------
    def _clip_gradients(self, grads: list[Any]) -> list[Any]:
        if self.clipnorm and self.clipnorm > 0:
            return [self._clip_by_norm(g) for g in grads]
        if self.global_clipnorm and self.global_clipnorm > 0:
            return self._clip_by_global_norm(grads)
        if self.clipvalue and self.clipvalue > 0:
            v = self.clipvalue
            return [get_array_module(g).clip(g, -v, v) for g in grads]
        return grads

    def _clip_by_norm(self, g: Any) -> Any:
        xp = get_array_module(g)
        l2sum = xp.sum(xp.square(g), keepdims=True)
        pred = l2sum > 0
        l2norm = xp.where(pred, xp.sqrt(xp.where(pred, l2sum, xp.ones_like(l2sum))), l2sum)
        c = g.dtype.type(self.clipnorm)
        return (g * c) / xp.maximum(l2norm, c)

    def _clip_by_global_norm(self, grads: list[Any]) -> list[Any]:
        xp = get_array_module(grads[0])
        dtype = grads[0].dtype
        total = xp.sum(xp.stack([xp.sum(xp.square(g)) for g in grads]))
        use_norm = xp.sqrt(total)
        c = self.global_clipnorm
        with np.errstate(divide="ignore", invalid="ignore"):
            # 1/c is formed in double and rounded once, as Keras does with a Python float.
            scale = dtype.type(c) * xp.minimum(dtype.type(1.0) / use_norm, dtype.type(1.0 / c))
            scale = scale + (use_norm - use_norm)
        return [g * scale for g in grads]

    def exclude_from_weight_decay(
        self,
        var_list: Iterable[Any] | None = None,
        var_names: Iterable[str] | None = None,
        *,
        var_paths: Iterable[str] | None = None,
    ) -> None:
        """Exclude variables from decay: by identity (``var_list``), by regex search of their
        ``name`` (``var_names``), or by exact ``path`` (``var_paths``, an extension of Keras's
        API: how exclusions by variable travel in a config, see
        :meth:`weight_decay_exclusions`)."""
        if self.built:
            raise ValueError(
                "`exclude_from_weight_decay()` can only be configured before the optimizer is "
                "built."
            )
        self._exclude_vars = list(var_list or [])
        self._exclude_ids = {self._key(v) for v in self._exclude_vars}
        self._exclude_paths = set(var_paths or [])
        names = list(var_names or [])
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"`var_names` must be strings. Received: {name!r}")
        self._exclude_names = sorted(set(names))
        self._exclude_pattern = re.compile("|".join(self._exclude_names)) if names else None

    def weight_decay_exclusions(
        self, paths_by_id: dict[int, str] | None = None, *, strict: bool = True
    ) -> dict[str, list[str]] | None:
        """The weight-decay exclusions by name: ``{"var_names": [...], "var_paths": [...]}``.

        ``var_list`` entries become paths: a Variable's own, a built optimizer's variable's,
        or ``paths_by_id[id(array)]``; an unnamed array raises ValueError (is left out when
        not ``strict``). None when nothing is excluded. :func:`~paramserve.optim_core.serialize`
        includes this, so exclusions survive a config round trip (Keras's config drops them).
        """
        paths = set(self._exclude_paths)
        for v in self._exclude_vars:
            if isinstance(v, Variable):
                paths.add(v.path)
                continue
            index = self._index_by_key.get(self._key(v))
            if index is not None:
                paths.add(self._trainable_variables[index].path)
            elif paths_by_id is not None and id(v) in paths_by_id:
                paths.add(paths_by_id[id(v)])
            elif strict:
                raise ValueError(
                    "A variable excluded from weight decay is an unnamed array of shape "
                    f"{np.shape(v)}, so the exclusion cannot be written into a config: pass "
                    "`Variable`s (with a path) or `var_names` to `exclude_from_weight_decay()`."
                )
        if not paths and not self._exclude_names:
            return None
        return {"var_names": list(self._exclude_names), "var_paths": sorted(paths)}

    def _use_weight_decay(self, variable: Variable) -> bool:
        if self._key(variable) in self._exclude_ids or variable.path in self._exclude_paths:
            return False
        return not (
            self._exclude_pattern is not None
            and self._exclude_pattern.search(variable.name) is not None
        )

    def _apply_weight_decay(self, variables: list[Variable]) -> None:
        if self.weight_decay is None:
            return
        for v in variables:
            slab = self._stand_in_slab(v)
            if slab is None:
                if self._use_weight_decay(v):
                    self._decay(v)
                continue
            decayed = [m for m in slab.variables if self._use_weight_decay(m)]
            if len(decayed) == len(slab.variables):
                self._decay(v)  # the whole slab at once: the same per-element rule
            else:
                for m in decayed:
                    self._decay(m)

    def _decay(self, v: Variable) -> None:
        dt = v.dtype.type
        lr = dt(self.learning_rate)
        wd = dt(self.weight_decay)
        for kernels in (fused, fused_gpu):
            if kernels.can_fuse(self, v.value):
                kernels.weight_decay(v.value, wd, lr)
                return
        v.assign(v.value - v.value * wd * lr)

    def _update_moving_averages(self) -> None:
        averages = self._model_variables_moving_average
        for var, index in self._units():
            avg = averages[index]
            dt = var.dtype.type
            mu = dt(self.ema_momentum) if self.iterations != 0 else dt(0)
            for kernels in (fused, fused_gpu):
                if kernels.can_fuse(self, avg.value, var.value):
                    kernels.ema(avg.value, var.value, mu, dt(1) - mu)
                    break
            else:
                avg.assign(mu * avg.value + (dt(1) - mu) * var.value)

    def _overwrite_with_averages(self) -> None:
        averages = self._model_variables_moving_average
        for var, index in self._units():
            var.assign(averages[index].value)

    def finalize_variable_values(self, var_list: Iterable[Any] | None = None) -> None:
        """With ``use_ema``, overwrite the model variables with their moving averages."""
        if self.use_ema:
            self._overwrite_with_averages()

    def scale_loss(self, loss: Any) -> Any:
        """Multiply a loss by ``loss_scale_factor`` (identity when it is None)."""
        return loss * self.loss_scale_factor if self.loss_scale_factor is not None else loss

    # --- weights and named state -------------------------------------------------------
    def _state_key(self, variable: Variable) -> str:
        return variable.name

    def _state_items(self) -> list[tuple[str, Variable]]:
        """Every state variable with its unique key, in :attr:`variables` order.

        The one list behind weights and state dicts; a wrapper extends it with its inner
        optimizer's items.
        """
        return [(self._state_key(v), v) for v in self._variables]

    def get_weights(self) -> list[np.ndarray]:
        """Host copies of :attr:`variables`: the iteration count first, then creation order."""
        return [v.numpy() for _, v in self._state_items()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Restore :meth:`get_weights` output; length, shapes and dtypes are checked first."""
        if not self.built:
            raise ValueError(
                "You are calling `set_weights()` on an optimizer that has not yet been built. "
                "Call `optimizer.build(variables)` first."
            )
        items = self._state_items()
        weights = list(weights)
        if len(weights) != len(items):
            raise ValueError(
                f"`set_weights()` expects {len(items)} arrays (the length of "
                f"`optimizer.variables`), received {len(weights)}."
            )
        self._load_checked(items, [np.asarray(to_numpy(w)) for w in weights])

    def state_owners(self) -> dict[str, str | None]:
        """For every key of :meth:`state_dict`, in its order: the path of the model variable
        the slot belongs to, or None for state of the whole step (the iteration count, the
        learning rate, Nadam's momentum-cache product, the dynamic loss scale ...).

        A job split over shards holds a variable's slots where the variable is, and the
        step-wide state on every shard; ``paramserve snapshot reshard`` moves them by this.
        """
        return {k: self._slot_owners.get(id(v)) for k, v in self._state_items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every optimizer variable as ``{unique name: host array}``, in :attr:`variables` order."""
        return {k: v.numpy() for k, v in self._state_items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; validates every entry before changing anything."""
        if not self.built:
            raise ValueError("Build the optimizer on its variables before loading its state.")
        items = self._state_items()
        expected = {k for k, _ in items}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"Optimizer state does not match this optimizer: missing keys {missing}, "
                f"unexpected keys {unexpected}."
            )
        self._load_checked(items, [np.asarray(to_numpy(state[k])) for k, _ in items])

    def _load_checked(self, items: list[tuple[str, Variable]], arrays: list[np.ndarray]) -> None:
        """Check every array against its variable, then assign them all (nothing half-done)."""
        for (key, var), arr in zip(items, arrays, strict=True):
            self._check_assignable(var, arr, key)
        for (_, var), arr in zip(items, arrays, strict=True):
            self._load_value(var, arr)

    @staticmethod
    def _check_assignable(var: Variable, arr: np.ndarray, label: str) -> None:
        if tuple(arr.shape) != var.shape:
            raise ValueError(
                f"Optimizer variable {label!r} has shape {var.shape}; received shape "
                f"{tuple(arr.shape)}."
            )
        if arr.dtype != var.dtype and arr.dtype.kind != var.dtype.kind:
            raise ValueError(
                f"Optimizer variable {label!r} has dtype {var.dtype.name}; received dtype "
                f"{arr.dtype.name}."
            )

    @staticmethod
    def _load_value(var: Variable, arr: np.ndarray) -> None:
        xp = var.xp
        var.assign(arr if xp is np else xp.asarray(arr))

    # --- config ------------------------------------------------------------------------
    def _lr_config(self) -> Any:
        lr = self._learning_rate
        if isinstance(lr, Variable):
            return float(lr.value)
        if isinstance(lr, LearningRateSchedule):
            return serialize_schedule(lr)
        return {
            "module": "builtins",
            "class_name": "function",
            "config": getattr(lr, "__qualname__", repr(lr)),
            "registered_name": "function",
        }

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-safe and in Keras's key order."""
        return {
            "name": self.name,
            "learning_rate": self._lr_config(),
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "loss_scale_factor": self.loss_scale_factor,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Optimizer:
        """Build an optimizer from :meth:`get_config` output (ours or real Keras's)."""
        config = dict(config)
        lr = config.get("learning_rate")
        if isinstance(lr, dict):
            config["learning_rate"] = deserialize_schedule(lr)
        return cls(**config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} iterations={self.iterations}>"
