"""LossScaleOptimizer: dynamic loss scaling around another optimizer, as in Keras 3."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import get_array_module
from .base import Optimizer
from .variables import Variable

INNER_PREFIX = "inner_optimizer/"

# Base options Keras still accepts (for old configs) as long as they keep their defaults.
_BASE_DEFAULTS: dict[str, Any] = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


class LossScaleOptimizer(Optimizer):
    """Unscales gradients by a dynamic loss scale ``s`` and applies ``inner_optimizer``.

    If every gradient is finite: ``inner.apply(g / s)``, then ``s <- 2s`` after
    ``dynamic_growth_steps`` consecutive finite steps. Otherwise the step is skipped and
    ``s <- s/2``. ``iterations`` and ``learning_rate`` are the inner optimizer's.
    """

    def __init__(
        self,
        inner_optimizer: Optimizer,
        initial_scale: float = 2.0**15,
        dynamic_growth_steps: int = 2000,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not kwargs.pop("dynamic", True):
            raise ValueError(
                "LossScaleOptimizer no longer supports `dynamic=False`. Instead, set "
                "`loss_scale_factor` directly on the `inner_optimizer`."
            )
        for arg, default in _BASE_DEFAULTS.items():
            if arg in kwargs and kwargs.pop(arg) != default:
                raise ValueError(
                    f"LossScaleOptimizer does not support `{arg}`. "
                    f"Instead, set `{arg}` on the `inner_optimizer`."
                )
        if kwargs:
            raise ValueError(
                f"LossScaleOptimizer does not support arguments: `{'`, `'.join(kwargs)}`."
            )
        if not isinstance(inner_optimizer, Optimizer):
            raise TypeError(
                "`inner_optimizer` must be an Optimizer instance. "
                f"Received: inner_optimizer={inner_optimizer!r}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.initial_scale = initial_scale
        self.dynamic_growth_steps = dynamic_growth_steps
        # The inner optimizer must not unscale a second time.
        inner_optimizer.loss_scale_factor = None

    def splits_rows(self) -> bool:
        """The inner optimizer's answer (the loss scale itself is one scalar)."""
        return self.inner_optimizer.splits_rows()

    def cross_variable_options(self) -> list[str]:
        """Dynamic loss scaling reads every gradient: one non-finite value skips the step."""
        return [
            "LossScaleOptimizer (one non-finite gradient anywhere skips the whole step)",
            *self.inner_optimizer.cross_variable_options(),
        ]

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self.step_counter = self.add_variable((), dtype="int32", name="step_counter")
        self.dynamic_scale = self.add_variable(
            (), initializer=float(self.initial_scale), dtype="float32", name="dynamic_scale"
        )
        self.inner_optimizer.build(self._trainable_variables)

    @property
    def variables(self) -> list[Variable]:
        """Its own four variables, then every variable of the inner optimizer."""
        return list(self._variables) + self.inner_optimizer.variables

    @property
    def iterations(self) -> int:
        return self.inner_optimizer.iterations

    @iterations.setter
    def iterations(self, value: int) -> None:
        self.inner_optimizer.iterations = value

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        self.inner_optimizer.learning_rate = value

    def _apply_prepared(self, grads: list[Any], variables: list[Variable]) -> None:
        finite = all(bool(get_array_module(g).isfinite(g).all()) for g in grads)
        if not finite:
            self.step_counter.assign(0)
            self.dynamic_scale.assign(self.dynamic_scale.value * np.float32(0.5))
            return
        scale = self.dynamic_scale.value[()]
        unscaled = []
        for g in grads:
            # Keras divides by the float32 scale, so float16 gradients are unscaled in float32.
            ct = np.promote_types(g.dtype, np.float32)
            unscaled.append(g.astype(ct, copy=False) / ct.type(scale))
        self.inner_optimizer.apply(unscaled, variables)
        if int(self.step_counter.value) == self.dynamic_growth_steps - 1:
            self.step_counter.assign(0)
            self.dynamic_scale.assign(self.dynamic_scale.value * np.float32(2.0))
        else:
            self.step_counter.assign(int(self.step_counter.value) + 1)

    def scale_loss(self, loss: Any) -> Any:
        """Multiply a loss by the current dynamic scale (``initial_scale`` before build)."""
        scale = self.dynamic_scale.value[()] if self.built else np.float32(self.initial_scale)
        return loss * scale

    def finalize_variable_values(self, var_list: Any = None) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    # --- weights and state cover the inner optimizer too --------------------------------
    def _state_items(self) -> list[tuple[str, Variable]]:
        inner = self.inner_optimizer._state_items()
        return super()._state_items() + [(INNER_PREFIX + k, v) for k, v in inner]

    def state_owners(self) -> dict[str, str | None]:
        """Its own (step-wide) variables, then the inner optimizer's owners."""
        inner = self.inner_optimizer.state_owners()
        own = {k: self._slot_owners.get(id(v)) for k, v in super()._state_items()}
        return {**own, **{INNER_PREFIX + k: owner for k, owner in inner.items()}}

    # --- config -------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        from .registry import serialize

        return {
            "name": self.name,
            # Not strict: get_config never raises; serialize(self) names what it can.
            "inner_optimizer": serialize(self.inner_optimizer, strict=False),
            "initial_scale": self.initial_scale,
            "dynamic_growth_steps": self.dynamic_growth_steps,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Optimizer:
        from .registry import deserialize

        config = dict(config)
        inner = config.pop("inner_optimizer")
        if isinstance(inner, dict):
            inner = deserialize(inner)
        return cls(inner, **config)
