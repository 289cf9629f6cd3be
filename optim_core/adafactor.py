"""Adafactor (factored second moments, no first moment), as in Keras 3."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Optimizer
from .variables import Variable


def _rms(xp: Any, x: Any) -> Any:
    return xp.sqrt(xp.mean(xp.square(x)))


class Adafactor(Optimizer):
    """Adafactor with the learning rate capped at ``1/sqrt(t)``.

    With ``G = g^2 + epsilon_1`` and ``b = 1 - t^beta_2_decay``: for rank >= 2 the row and
    column statistics ``r <- b*r + (1-b)*mean(G, -1)``, ``c <- b*c + (1-b)*mean(G, -2)``
    give ``v = (r / mean(r, -1))[..., None] * c[..., None, :]``; smaller ranks keep
    ``v <- b*v + (1-b)*G``. Then ``u = g/sqrt(v)``, ``u /= max(1, RMS(u)/clip_threshold)``
    and ``w -= max(epsilon_2, RMS(w)) * min(lr, 1/sqrt(t)) * u``. ``relative_step`` is kept
    for config compatibility; as in Keras it changes nothing.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_2_decay: float = -0.8,
        epsilon_1: float = 1e-30,
        epsilon_2: float = 1e-3,
        clip_threshold: float = 1.0,
        relative_step: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta_2_decay = beta_2_decay
        self.epsilon_1 = epsilon_1
        self.epsilon_2 = epsilon_2
        self.clip_threshold = clip_threshold
        self.relative_step = relative_step

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._r: list[Variable] = []
        self._c: list[Variable] = []
        self._v: list[Variable] = []
        # The r/c slots share their Keras name, so state_dict() keys them separately.
        self._slot_keys: dict[int, str] = {}
        for var in self._trainable_variables:
            prefix = var.path.replace("/", "_")
            if var.ndim < 2:
                # Keras keeps unused int32 placeholders, named after the variable and
                # outside the optimizer's scope, so the slot positions stay aligned.
                r, c = (self._placeholder(var) for _ in range(2))
            else:
                r_shape, c_shape = var.shape[:-1], var.shape[:-2] + var.shape[-1:]
                r, c = (
                    self.add_variable(shape, dtype=var.dtype, name=var.name, xp=var.xp, owner=var)
                    for shape in (r_shape, c_shape)
                )
            self._slot_keys[id(r)], self._slot_keys[id(c)] = f"{prefix}_r", f"{prefix}_c"
            self._r.append(r)
            self._c.append(c)
            self._v.append(self.add_variable_from_reference(var, "velocity"))

    def _placeholder(self, var: Variable) -> Variable:
        slot = self.add_variable((), dtype="int32", name=var.name, xp=var.xp, owner=var)
        slot.path = var.name
        return slot

    def _state_key(self, variable: Variable) -> str:
        return getattr(self, "_slot_keys", {}).get(id(variable), variable.name)

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        dt = variable.dtype.type
        xp = variable.xp
        one = dt(1)
        t = dt(self.iterations + 1)
        index = self._get_variable_index(variable)
        r, c, v = self._r[index], self._c[index], self._v[index]

        rho_t = np.minimum(dt(learning_rate), one / np.sqrt(t))
        alpha_t = xp.maximum(dt(self.epsilon_2), _rms(xp, variable.value)) * rho_t
        grad_sq = xp.square(gradient) + dt(self.epsilon_1)
        beta_2_t = one - np.power(t, dt(self.beta_2_decay))
        if variable.ndim >= 2:
            r.assign(beta_2_t * r.value + (one - beta_2_t) * xp.mean(grad_sq, axis=-1))
            c.assign(beta_2_t * c.value + (one - beta_2_t) * xp.mean(grad_sq, axis=-2))
            row_factor = r.value / xp.mean(r.value, axis=-1, keepdims=True)
            v.assign(xp.expand_dims(row_factor, -1) * xp.expand_dims(c.value, -2))
        else:
            v.assign(beta_2_t * v.value + (one - beta_2_t) * grad_sq)
        u = gradient / xp.sqrt(v.value)
        u_hat = u / xp.maximum(one, _rms(xp, u) / dt(self.clip_threshold))
        self.assign_sub(variable, alpha_t * u_hat)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_2_decay": self.beta_2_decay,
                "epsilon_1": self.epsilon_1,
                "epsilon_2": self.epsilon_2,
                "clip_threshold": self.clip_threshold,
                "relative_step": self.relative_step,
            }
        )
        return config
