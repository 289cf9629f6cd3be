"""Adam (with optional AMSGrad), as in Keras 3: epsilon outside the bias correction."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import fused, fused_gpu
from .base import Optimizer
from .variables import Variable


class Adam(Optimizer):
    """``alpha = lr*sqrt(1-b2^t)/(1-b1^t); m += (g-m)(1-b1); v += (g^2-v)(1-b2);
    w -= m*alpha/(sqrt(v)+eps)``; with ``amsgrad`` the max of the raw ``v`` is used.
    """

    rows_separable = True
    elementwise_update = True  # the same rule per element: slabs update whole

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._momentums, self._velocities = self.add_optimizer_variables(
            self._trainable_variables, ["momentum", "velocity"]
        )
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(
                self._trainable_variables, "velocity_hat"
            )

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        scalars = self._step_scalars(variable.dtype.type, variable.xp, learning_rate)
        self._update_variable(gradient, variable, scalars)

    def _backend_update_step(
        self, grads: list[Any], variables: list[Variable], learning_rate: Any
    ) -> None:
        """The per-variable loop, with the step's scalars formed once per dtype and backend.

        The scalars depend on the step, the learning rate and the dtype only, so forming
        them once gives each variable the very values :meth:`update_step` would. A subclass
        that overrides ``update_step`` gets the base class's plain loop.
        """
        if type(self).update_step is not Adam.update_step:
            super()._backend_update_step(grads, variables, learning_rate)
            return
        cache: dict[tuple[Any, Any], tuple[Any, Any, Any, Any]] = {}
        for g, v in zip(grads, variables, strict=True):
            key = (v.dtype.type, v.xp)
            scalars = cache.get(key)
            if scalars is None:
                scalars = cache[key] = self._step_scalars(*key, learning_rate)
            self._update_variable(g, v, scalars)

    def _step_scalars(self, dt: Any, xp: Any, learning_rate: Any) -> tuple[Any, Any, Any, Any]:
        """``(alpha, 1-beta_1, 1-beta_2, epsilon)`` of this step in dtype ``dt``, on the host
        whatever ``xp`` (an IEEE square root: the same bits as on the device)."""
        lr = dt(learning_rate)
        t = dt(self.iterations + 1)
        beta_1_power = np.power(dt(self.beta_1), t)
        beta_2_power = np.power(dt(self.beta_2), t)
        alpha = lr * np.sqrt(dt(1) - beta_2_power) / (dt(1) - beta_1_power)
        return alpha, dt(1 - self.beta_1), dt(1 - self.beta_2), dt(self.epsilon)

    def _update_variable(
        self, gradient: Any, variable: Variable, scalars: tuple[Any, Any, Any, Any]
    ) -> None:
        """The Adam rule for one variable, given the step's scalars (:meth:`_step_scalars`)."""
        alpha, one_minus_b1, one_minus_b2, eps = scalars
        xp = variable.xp
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        v_hat_value = self._velocity_hats[index].value if self.amsgrad else None
        arrays = [variable.value, gradient, m.value, v.value]
        for kernels in (fused, fused_gpu):
            if kernels.can_fuse(self, *arrays, *([v_hat_value] if self.amsgrad else [])):
                kernels.adam(*arrays, alpha, one_minus_b1, one_minus_b2, eps, v_hat=v_hat_value)
                return
        m.assign_add((gradient - m.value) * one_minus_b1)
        v.assign_add((xp.square(gradient) - v.value) * one_minus_b2)
        v_used = v.value
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            v_hat.assign(xp.maximum(v_hat.value, v.value))
            v_used = v_hat.value
        self.assign_sub(variable, (m.value * alpha) / (xp.sqrt(v_used) + eps))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
            }
        )
        return config
