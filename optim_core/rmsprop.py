"""RMSprop (optionally centered and with momentum), as in Keras 3."""

from __future__ import annotations

from typing import Any

from . import fused_gpu
from .base import Optimizer
from .variables import Variable


class RMSprop(Optimizer):
    """``v <- rho*v + (1-rho)*g^2; inc = lr*g / sqrt(v [- gbar^2] + eps); w -= inc``, no bias
    correction; centered keeps ``gbar`` likewise; momentum > 0 subtracts ``mom <- mu*mom + inc``.
    """

    rows_separable = True
    elementwise_update = True  # the same rule per element: slabs update whole

    def __init__(
        self,
        learning_rate: Any = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rho = rho
        self.momentum = momentum
        self.epsilon = epsilon
        self.centered = centered

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        trainable = self._trainable_variables
        self._velocities = self.add_optimizer_variables(trainable, "velocity")
        self._momentums = []
        if self.momentum > 0:
            self._momentums = self.add_optimizer_variables(trainable, "momentum")
        self._average_gradients = []
        if self.centered:
            self._average_gradients = self.add_optimizer_variables(trainable, "average_gradient")

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        rho = dt(self.rho)
        # Keras forms 1 - rho in Python double, then rounds it to the variable dtype.
        one_minus_rho = dt(1 - self.rho)
        eps = dt(self.epsilon)
        index = self._get_variable_index(variable)
        velocity = self._velocities[index]
        avg = self._average_gradients[index] if self.centered else None
        mom = self._momentums[index] if self.momentum > 0 else None
        slots = [s.value for s in (velocity, avg, mom) if s is not None]
        if fused_gpu.can_fuse(self, variable.value, gradient, *slots):
            fused_gpu.rmsprop(
                variable.value,
                gradient,
                velocity.value,
                lr,
                rho,
                one_minus_rho,
                eps,
                average_gradient=None if avg is None else avg.value,
                momentum=None if mom is None else mom.value,
                mu=dt(self.momentum),
            )
            return
        velocity.assign(rho * velocity.value + one_minus_rho * xp.square(gradient))
        if avg is not None:
            avg.assign(rho * avg.value + one_minus_rho * gradient)
            denominator = velocity.value - xp.square(avg.value) + eps
        else:
            denominator = velocity.value + eps
        increment = (lr * gradient) / xp.sqrt(denominator)
        if mom is not None:
            mom.assign(dt(self.momentum) * mom.value + increment)
            self.assign_sub(variable, mom.value)
        else:
            self.assign_sub(variable, increment)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "rho": self.rho,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "centered": self.centered,
            }
        )
        return config
