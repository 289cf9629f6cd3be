"""Nadam (Adam with Nesterov momentum and the 0.96 momentum-cache schedule), as in Keras 3."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import fused_gpu
from .base import Optimizer
from .variables import Variable

# Fixed decay of the momentum-cache schedule: mu_t = beta_1 * (1 - 0.5 * 0.96^t).
_CACHE_DECAY = 0.96


class Nadam(Optimizer):
    """``P <- P*mu_t`` once per step; ``m += (g-m)(1-b1); v += (g^2-v)(1-b2);
    w -= lr*(mu_{t+1}*m/(1-P*mu_{t+1}) + (1-mu_t)*g/(1-P)) / (sqrt(v/(1-b2^t)) + eps)``.
    """

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
        trainable = self._trainable_variables
        self._momentums, self._velocities = self.add_optimizer_variables(
            trainable, ["momentum", "velocity"]
        )
        # The running product of the momentum cache: one scalar in the first variable's
        # dtype, created after the slots so it is listed last (Keras names it "variable").
        dtype = trainable[0].dtype if trainable else np.dtype("float32")
        self._u_product = self.add_variable((), initializer=1.0, dtype=dtype, name="variable")

    @staticmethod
    def _cache_factor(dt: Any, step: Any) -> Any:
        """``1 - 0.5 * 0.96^step`` in the scalar type ``dt`` (np.power, as Keras's ufunc)."""
        return dt(1.0) - dt(0.5) * np.power(dt(_CACHE_DECAY), step)

    def _backend_update_step(
        self, grads: list[Any], variables: list[Variable], learning_rate: Any
    ) -> None:
        dt = self._u_product.dtype.type
        factor = self._cache_factor(dt, dt(self.iterations + 1))
        self._u_product.assign((self._u_product.value[()] * dt(self.beta_1)) * factor)
        super()._backend_update_step(grads, variables, learning_rate)

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        t = dt(self.iterations + 1)
        beta_1 = dt(self.beta_1)
        beta_2 = dt(self.beta_2)
        one = dt(1)
        mu_t = beta_1 * self._cache_factor(dt, t)
        mu_next = beta_1 * self._cache_factor(dt, dt(self.iterations + 2))
        product = dt(self._u_product.value[()])
        product_next = product * mu_next
        beta_2_power = np.power(beta_2, t)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        if fused_gpu.can_fuse(self, variable.value, gradient, m.value, v.value):
            scalars = (
                lr,
                one - beta_1,
                one - beta_2,
                mu_next,
                one - product_next,
                one - mu_t,
                one - product,
                one - beta_2_power,
                dt(self.epsilon),
            )
            fused_gpu.nadam(variable.value, gradient, m.value, v.value, scalars)
            return
        # Here 1 - beta is formed in the variable dtype from the rounded beta.
        m.assign(m.value + (gradient - m.value) * (one - beta_1))
        v.assign(v.value + (xp.square(gradient) - v.value) * (one - beta_2))
        m_hat = (mu_next * m.value) / (one - product_next) + ((one - mu_t) * gradient) / (
            one - product
        )
        v_hat = v.value / (one - beta_2_power)
        self.assign_sub(variable, (m_hat * lr) / (xp.sqrt(v_hat) + dt(self.epsilon)))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon})
        return config
