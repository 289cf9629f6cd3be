"""SGD with optional (Nesterov) momentum, as in Keras 3."""

from __future__ import annotations

from typing import Any

from . import fused, fused_gpu
from .base import Optimizer
from .variables import Variable


class SGD(Optimizer):
    """``m <- m*momentum - g*lr; w <- w + m`` (Nesterov: ``w <- w + m*momentum - g*lr``).

    With ``momentum == 0.0`` no slot is created and the rule is ``w <- w - g*lr``.
    """

    rows_separable = True
    elementwise_update = True  # the same rule per element: slabs update whole

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        if not isinstance(momentum, float) or momentum < 0 or momentum > 1:
            raise ValueError("`momentum` must be a float between [0, 1].")
        self.momentum = momentum
        self.nesterov = nesterov

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(self._trainable_variables, "momentum")

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        lr = dt(learning_rate)
        if self.momentum == 0:
            for kernels in (fused, fused_gpu):
                if kernels.can_fuse(self, variable.value, gradient):
                    kernels.sgd(variable.value, gradient, lr)
                    return
            self.assign_sub(variable, gradient * lr)
            return
        m = self.momentums[self._get_variable_index(variable)]
        mu = dt(self.momentum)
        for kernels in (fused, fused_gpu):
            if kernels.can_fuse(self, variable.value, gradient, m.value):
                kernels.sgd_momentum(variable.value, gradient, m.value, mu, lr, self.nesterov)
                return
        m.assign(m.value * mu - gradient * lr)
        if self.nesterov:
            self.assign_add(variable, m.value * mu - gradient * lr)
        else:
            self.assign_add(variable, m.value)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config
