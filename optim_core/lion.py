"""Lion (sign of an interpolated momentum), as in Keras 3."""

from __future__ import annotations

from typing import Any

from . import fused_gpu
from .base import Optimizer
from .variables import Variable


class Lion(Optimizer):
    """``w -= lr*sign(b1*m + (1-b1)*g)`` with the old ``m``; then ``m <- b2*m + (1-b2)*g``."""

    rows_separable = True
    elementwise_update = True  # the same rule per element: slabs update whole

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        if beta_1 <= 0 or beta_1 > 1:
            raise ValueError(
                "Argument `beta_1` must be in the [0, 1] range. Otherwise, the "
                f"optimizer degenerates to SignSGD. Received: beta_1={beta_1}."
            )

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._momentums = self.add_optimizer_variables(self._trainable_variables, "momentum")

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        # The betas are rounded first and 1 - beta is formed in the variable dtype.
        beta_1 = dt(self.beta_1)
        beta_2 = dt(self.beta_2)
        one = dt(1.0)
        m = self._momentums[self._get_variable_index(variable)]
        if fused_gpu.can_fuse(self, variable.value, gradient, m.value):
            fused_gpu.lion(
                variable.value, gradient, m.value, lr, beta_1, one - beta_1, beta_2, one - beta_2
            )
            return
        direction = xp.sign(m.value * beta_1 + gradient * (one - beta_1))
        self.assign_sub(variable, lr * direction)
        m.assign(m.value * beta_2 + gradient * (one - beta_2))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2})
        return config
