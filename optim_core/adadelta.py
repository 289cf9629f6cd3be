"""Adadelta, as in Keras 3 (the step is scaled by the learning rate)."""

from __future__ import annotations

from typing import Any

from . import fused_gpu
from .base import Optimizer
from .variables import Variable


class Adadelta(Optimizer):
    """``Eg <- rho*Eg + (1-rho)*g^2; d = -sqrt(Ex+eps)*g / sqrt(Eg+eps);
    Ex <- rho*Ex + (1-rho)*d^2; w += lr*d`` (``Ex`` read before its update).
    """

    rows_separable = True
    elementwise_update = True  # the same rule per element: slabs update whole

    def __init__(
        self,
        learning_rate: Any = 0.001,
        rho: float = 0.95,
        epsilon: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rho = rho
        self.epsilon = epsilon

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._accumulated_grads, self._accumulated_delta_vars = self.add_optimizer_variables(
            self._trainable_variables, ["accumulated_grad", "accumulated_delta_var"]
        )

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        rho = dt(self.rho)
        # 1 - rho is computed in Python double and rounded once, as Keras does.
        one_minus_rho = dt(1 - self.rho)
        eps = dt(self.epsilon)
        index = self._get_variable_index(variable)
        grad_sq_avg = self._accumulated_grads[index]
        delta_sq_avg = self._accumulated_delta_vars[index]
        slots = (grad_sq_avg.value, delta_sq_avg.value)
        if fused_gpu.can_fuse(self, variable.value, gradient, *slots):
            fused_gpu.adadelta(variable.value, gradient, *slots, lr, rho, one_minus_rho, eps)
            return
        grad_sq_avg.assign(rho * grad_sq_avg.value + one_minus_rho * xp.square(gradient))
        delta = -((xp.sqrt(delta_sq_avg.value + eps) * gradient) / xp.sqrt(grad_sq_avg.value + eps))
        delta_sq_avg.assign(rho * delta_sq_avg.value + one_minus_rho * xp.square(delta))
        self.assign_add(variable, lr * delta)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"rho": self.rho, "epsilon": self.epsilon})
        return config
