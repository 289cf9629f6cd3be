"""Adagrad, as in Keras 3: epsilon inside the square root."""

from __future__ import annotations

from typing import Any

from . import fused_gpu
from .base import Optimizer
from .variables import Variable


class Adagrad(Optimizer):
    """``acc <- acc + g^2; w -= lr*g / sqrt(acc + eps)``, with ``acc`` starting at
    ``initial_accumulator_value``.
    """

    rows_separable = True
    elementwise_update = True  # the same rule per element: slabs update whole

    def __init__(
        self,
        learning_rate: Any = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._accumulators = self.add_optimizer_variables(
            self._trainable_variables, "accumulator", self.initial_accumulator_value
        )

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        eps = dt(self.epsilon)
        acc = self._accumulators[self._get_variable_index(variable)]
        if fused_gpu.can_fuse(self, variable.value, gradient, acc.value):
            fused_gpu.adagrad(variable.value, gradient, acc.value, lr, eps)
            return
        acc.assign(acc.value + xp.square(gradient))
        self.assign_sub(variable, (lr * gradient) / xp.sqrt(acc.value + eps))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon,
            }
        )
        return config
