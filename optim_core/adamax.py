"""Adamax (Adam with an infinity-norm second moment), as in Keras 3."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import fused_gpu
from .base import Optimizer
from .variables import Variable


class Adamax(Optimizer):
    """``m += (g-m)(1-b1); u <- max(b2*u, |g|); w -= lr*m / ((1-b1^t)*(u+eps))``."""

    rows_separable = True
    elementwise_update = True  # the same rule per element: slabs update whole

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._m, self._u = self.add_optimizer_variables(
            self._trainable_variables, ["momentum", "norm"]
        )

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        t = dt(self.iterations + 1)
        # np.power (not **) on scalars: the same ufunc loop Keras runs on 0-d arrays.
        beta_1_power = np.power(dt(self.beta_1), t)
        index = self._get_variable_index(variable)
        m = self._m[index]
        u = self._u[index]
        one_minus_b1 = dt(1 - self.beta_1)
        beta_2 = dt(self.beta_2)
        one_minus_b1_power = dt(1) - beta_1_power
        eps = dt(self.epsilon)
        if fused_gpu.can_fuse(self, variable.value, gradient, m.value, u.value):
            fused_gpu.adamax(
                variable.value,
                gradient,
                m.value,
                u.value,
                lr,
                one_minus_b1,
                beta_2,
                one_minus_b1_power,
                eps,
            )
            return
        m.assign(m.value + (gradient - m.value) * one_minus_b1)
        u.assign(xp.maximum(beta_2 * u.value, xp.abs(gradient)))
        denominator = one_minus_b1_power * (u.value + eps)
        self.assign_sub(variable, (lr * m.value) / denominator)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon})
        return config
