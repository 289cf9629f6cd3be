"""Schedule-free AdamW (the model holds the interpolation point y), as in Keras 3."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Optimizer
from .variables import Variable


class ScheduleFreeAdamW(Optimizer):
    """Schedule-free AdamW; the ``momentum`` slot ``z`` starts as a copy of the variable.

    ``lr' = lr * min(t/warmup_steps, 1)`` (if ``warmup_steps > 0``);
    ``v += (g^2 - v)(1-b2)``; ``z -= lr'*g / (sqrt(v/(1-b2^t)) + eps)``;
    ``x = (w - (1-b1)*z_old)/b1``; ``x = (1-1/t)*x + z/t``; ``w <- (1-b1)*z + b1*x``.
    """

    rows_separable = True

    def __init__(
        self,
        learning_rate: Any = 0.0025,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.warmup_steps = warmup_steps

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._momentums, self._velocities = self.add_optimizer_variables(
            self._trainable_variables, ["momentum", "velocity"]
        )
        for z, var in zip(self._momentums, self._trainable_variables, strict=True):
            z.assign(var.value)

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        one = dt(1)
        lr = dt(learning_rate)
        t = dt(self.iterations + 1)
        beta_1, beta_2 = dt(self.beta_1), dt(self.beta_2)
        if self.warmup_steps > 0:
            lr = lr * np.minimum(t / dt(self.warmup_steps), one)
        index = self._get_variable_index(variable)
        z, v = self._momentums[index], self._velocities[index]
        z_old = z.value.copy()

        v.assign_add((xp.square(gradient) - v.value) * (one - beta_2))
        denom = xp.sqrt(v.value / (one - np.power(beta_2, t))) + dt(self.epsilon)
        z.assign_sub((lr * gradient) / denom)
        weight = one / t
        x_old = (variable.value - (one - beta_1) * z_old) / beta_1
        x_new = (one - weight) * x_old + weight * z.value
        variable.assign((one - beta_1) * z.value + beta_1 * x_new)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "warmup_steps": self.warmup_steps,
            }
        )
        return config
