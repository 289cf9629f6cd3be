"""Adam (with optional AMSGrad), as in Keras 3: epsilon outside the bias correction."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import fused
from .base import Optimizer
from .variables import Variable


class Adam(Optimizer):
    """``alpha = lr*sqrt(1-b2^t)/(1-b1^t); m += (g-m)(1-b1); v += (g^2-v)(1-b2);
    w -= m*alpha/(sqrt(v)+eps)``; with ``amsgrad`` the max of the raw ``v`` is used.
    """

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
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        t = dt(self.iterations + 1)
        beta_1_power = np.power(dt(self.beta_1), t)
        beta_2_power = np.power(dt(self.beta_2), t)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        alpha = lr * xp.sqrt(dt(1) - beta_2_power) / (dt(1) - beta_1_power)
        one_minus_b1 = dt(1 - self.beta_1)
        one_minus_b2 = dt(1 - self.beta_2)
        eps = dt(self.epsilon)
        v_hat_value = self._velocity_hats[index].value if self.amsgrad else None
        arrays = [variable.value, gradient, m.value, v.value]
        if fused.can_fuse(self, *arrays, *([v_hat_value] if self.amsgrad else [])):
            fused.adam(*arrays, alpha, one_minus_b1, one_minus_b2, eps, v_hat=v_hat_value)
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
