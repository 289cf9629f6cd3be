"""FTRL-Proximal, as in Keras 3: the weight is recomputed from the linear term each step."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import fused_gpu
from .base import Optimizer
from .variables import Variable


class Ftrl(Optimizer):
    """``n' = n + g^2; z += g + 2*l2s*w - (n'^-p - n^-p)/lr*w;
    w = (clip(z, -l1, l1) - z) / (n'^-p/lr + 2*(l2 + beta/(2*lr))); n = n'``.
    """

    rows_separable = True

    def __init__(
        self,
        learning_rate: Any = 0.001,
        learning_rate_power: float = -0.5,
        initial_accumulator_value: float = 0.1,
        l1_regularization_strength: float = 0.0,
        l2_regularization_strength: float = 0.0,
        l2_shrinkage_regularization_strength: float = 0.0,
        beta: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        if initial_accumulator_value < 0.0:
            raise ValueError(
                "`initial_accumulator_value` needs to be positive or zero. "
                f"Received: initial_accumulator_value={initial_accumulator_value}."
            )
        if learning_rate_power > 0.0:
            raise ValueError(
                "`learning_rate_power` needs to be negative or zero. "
                f"Received: learning_rate_power={learning_rate_power}."
            )
        if l1_regularization_strength < 0.0:
            raise ValueError(
                "`l1_regularization_strength` needs to be positive or zero. "
                f"Received: l1_regularization_strength={l1_regularization_strength}."
            )
        if l2_regularization_strength < 0.0:
            raise ValueError(
                "`l2_regularization_strength` needs to be positive or zero. "
                f"Received: l2_regularization_strength={l2_regularization_strength}."
            )
        if l2_shrinkage_regularization_strength < 0.0:
            raise ValueError(
                "`l2_shrinkage_regularization_strength` needs to be positive or zero. "
                "Received: l2_shrinkage_regularization_strength"
                f"={l2_shrinkage_regularization_strength}."
            )
        self.learning_rate_power = learning_rate_power
        self.initial_accumulator_value = initial_accumulator_value
        self.l1_regularization_strength = l1_regularization_strength
        self.l2_regularization_strength = l2_regularization_strength
        self.l2_shrinkage_regularization_strength = l2_shrinkage_regularization_strength
        self.beta = beta

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._accumulators = []
        self._linears = []
        # Interleaved per variable; the two kinds have different initial values.
        for var in self._trainable_variables:
            self._accumulators.append(
                self.add_variable_from_reference(var, "accumulator", self.initial_accumulator_value)
            )
            self._linears.append(self.add_variable_from_reference(var, "linear"))

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(learning_rate)
        index = self._get_variable_index(variable)
        accum = self._accumulators[index]
        linear = self._linears[index]
        power = dt(-self.learning_rate_power)
        l1 = dt(self.l1_regularization_strength)
        l2 = dt(self.l2_regularization_strength) + dt(self.beta) / (dt(2.0) * lr)
        w = variable.value
        # 2 * l2s is formed in Python double, then rounded, as Keras does.
        l2s2 = dt(2 * self.l2_shrinkage_regularization_strength)
        two_l2 = dt(2) * l2
        if fused_gpu.can_fuse(self, w, gradient, accum.value, linear.value):
            fused_gpu.ftrl(w, gradient, accum.value, linear.value, lr, power, l1, two_l2, l2s2)
            return
        shrunk_grad = gradient + l2s2 * w
        new_accum = accum.value + xp.square(gradient)
        new_accum_pow = _power(xp, new_accum, power)
        sigma = (new_accum_pow - _power(xp, accum.value, power)) / lr
        linear.assign(linear.value + (shrunk_grad - sigma * w))
        quadratic = new_accum_pow / lr + two_l2
        z = linear.value
        self.assign(variable, (xp.clip(z, -l1, l1) - z) / quadratic)
        accum.assign(new_accum)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "learning_rate_power": self.learning_rate_power,
                "initial_accumulator_value": self.initial_accumulator_value,
                "l1_regularization_strength": self.l1_regularization_strength,
                "l2_regularization_strength": self.l2_regularization_strength,
                "l2_shrinkage_regularization_strength": (self.l2_shrinkage_regularization_strength),
                "beta": self.beta,
            }
        )
        return config


def _power(xp: Any, x: Any, p: Any) -> Any:
    """``x**p`` as Keras's numpy backend computes it on NumPy; on another array module, in
    float64 rounded once to ``x``'s dtype when that is narrower (a correctly rounded power).

    ``n'^p - n^p`` cancels, so a 1-ulp error of a power grows to ~1e-3 relative in ``w``
    over 50 steps. CuPy's float32 power (CUDA's ``powf``, not correctly rounded) was
    measured 4e-4 away from Keras on a GPU; a correctly rounded power is within 7.9e-7 of it
    (NumPy's own float32 power is correctly rounded at the default ``p = 0.5``, not at every
    ``p``): tests/optim/ftrl_pow_study.py measures it on the CPU.
    """
    if xp is np or x.dtype.itemsize >= 8:
        return xp.power(x, p)
    return xp.power(x.astype(np.float64), np.float64(p)).astype(x.dtype)
