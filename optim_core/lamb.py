"""Lamb (Adam direction scaled by a per-tensor trust ratio), as in Keras 3."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Optimizer
from .variables import Variable


class Lamb(Optimizer):
    """``r = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps); w -= (|w|/|r|)*lr*r`` with Adam's
    ``m``, ``v`` updates; the ratio is 1 when either tensor norm is 0.
    """

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
        self._momentums, self._velocities = self.add_optimizer_variables(
            self._trainable_variables, ["momentum", "velocity"]
        )

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        t = dt(self.iterations + 1)
        one = dt(1.0)
        # np.power (not **) on scalars: the same ufunc loop Keras runs on 0-d arrays.
        beta_1_power = np.power(dt(self.beta_1), t)
        beta_2_power = np.power(dt(self.beta_2), t)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        # Here 1 - beta is formed in Python double and rounded once.
        m.assign(m.value + (gradient - m.value) * dt(1 - self.beta_1))
        v.assign(v.value + (xp.square(gradient) - v.value) * dt(1 - self.beta_2))
        m_hat = m.value / (one - beta_1_power)
        denominator = xp.sqrt(v.value / (one - beta_2_power)) + dt(self.epsilon)
        update = m_hat / denominator
        two = dt(2)
        w_norm = xp.sqrt(xp.sum(xp.power(variable.value, two)))
        r_norm = xp.sqrt(xp.sum(xp.power(update, two)))
        # ratio = w_norm / r_norm when both are > 0, else 1 (NaN norms also give 1);
        # the divisor is masked so no division by zero is ever evaluated.
        r_positive = r_norm > 0
        ratio = xp.where((w_norm > 0) & r_positive, w_norm / xp.where(r_positive, r_norm, one), one)
        self.assign_sub(variable, ratio * lr * update)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon})
        return config
