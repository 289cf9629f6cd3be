"""Muon (orthogonalised momentum for 2-D weights, AdamW for the rest), as in Keras 3."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .backend import get_array_module
from .base import Optimizer
from .variables import Variable


class Muon(Optimizer):
    """Muon for 2-D variables; AdamW for other ranks, embeddings and ``exclude_layers``.

    Muon path: ``m <- mu*m + g``; ``X = g + mu*m`` (nesterov) or ``m``; ``X`` is
    orthogonalised by ``ns_steps`` Newton-Schulz steps (``A = X X^T``,
    ``X <- a*X + (b*A + c*A A) X``, on the wide orientation, after ``X /= |X|_F + 1e-7``);
    ``w -= lr * X * sqrt(max(rows, cols)) * rms_rate`` (no factor if ``rms_rate`` is None).
    AdamW path: Adam with ``lr * adam_lr_ratio``, ``adam_beta_1/2`` and ``epsilon``.
    Decay ``w -= w*wd*lr`` uses ``adam_weight_decay`` on the AdamW path and
    ``weight_decay`` on the Muon path (None skips it).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        adam_beta_1: float = 0.9,
        adam_beta_2: float = 0.999,
        adam_weight_decay: float | None = 0.004,
        epsilon: float = 1e-7,
        weight_decay: float | None = 0.004,
        exclude_layers: list[str] | None = None,
        exclude_embeddings: bool = True,
        muon_a: float = 3.4445,
        muon_b: float = -4.7750,
        muon_c: float = 2.0315,
        adam_lr_ratio: float = 1,
        momentum: float = 0.95,
        ns_steps: int = 5,
        nesterov: bool = True,
        rms_rate: float | None = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.adam_beta_1 = adam_beta_1
        self.adam_beta_2 = adam_beta_2
        self.epsilon = epsilon
        self.muon_a = muon_a
        self.muon_b = muon_b
        self.muon_c = muon_c
        self.adam_lr_ratio = adam_lr_ratio
        self.momentum = momentum
        self.ns_steps = ns_steps
        self.nesterov = nesterov
        self.exclude_embeddings = exclude_embeddings
        self.exclude_layers = exclude_layers or []
        self.adam_weight_decay = adam_weight_decay
        self.rms_rate = rms_rate

    def _should_use_adamw(self, variable: Variable) -> bool:
        if variable.ndim != 2:
            return True
        if self.exclude_embeddings and "embedding" in variable.path.lower():
            return True
        return any(re.search(keyword, variable.path) for keyword in self.exclude_layers)

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums: list[Variable] = []
        self.adam_velocities: list[Variable | None] = []
        for var in self._trainable_variables:
            self.momentums.append(self.add_variable_from_reference(var, "momentum"))
            use_adamw = self._should_use_adamw(var)
            velocity = self.add_variable_from_reference(var, "velocity") if use_adamw else None
            self.adam_velocities.append(velocity)

    def _apply_weight_decay(self, variables: list[Variable]) -> None:
        for var in variables:
            if not self._use_weight_decay(var):
                continue
            adamw = self._should_use_adamw(var)
            wd = self.adam_weight_decay if adamw else self.weight_decay
            if wd is None:
                continue
            dt = var.dtype.type
            var.assign(var.value - var.value * dt(wd) * dt(self.learning_rate))

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        index = self._get_variable_index(variable)
        m, v = self.momentums[index], self.adam_velocities[index]
        if v is None:
            self._muon_step(gradient, variable, learning_rate, m)
            return
        dt = variable.dtype.type
        xp = variable.xp
        lr = dt(np.float32(learning_rate) * np.float32(self.adam_lr_ratio))
        t = dt(self.iterations + 1)
        # np.power, not the scalar ``**``: the two round differently in float32.
        beta_1_power = np.power(dt(self.adam_beta_1), t)
        beta_2_power = np.power(dt(self.adam_beta_2), t)
        alpha = lr * np.sqrt(dt(1) - beta_2_power) / (dt(1) - beta_1_power)
        m.assign_add((gradient - m.value) * dt(1 - self.adam_beta_1))
        v.assign_add((xp.square(gradient) - v.value) * dt(1 - self.adam_beta_2))
        self.assign_sub(variable, (m.value * alpha) / (xp.sqrt(v.value) + dt(self.epsilon)))

    def _muon_step(
        self, gradient: Any, variable: Variable, learning_rate: Any, m: Variable
    ) -> None:
        dt = variable.dtype.type
        m.assign_add(gradient + m.value * dt(self.momentum - 1))
        x = gradient + dt(self.momentum) * m.value if self.nesterov else m.value
        x = self._newton_schulz(x, dt)
        # As in Keras the scaling runs in float32 at least (lr is a float32 value).
        ct = np.promote_types(variable.dtype, np.float32)
        update = x.astype(ct, copy=False) * ct.type(np.float32(learning_rate))
        if self.rms_rate is not None:
            scale = np.sqrt(np.float32(max(variable.shape[0], variable.shape[1])))
            update = update * ct.type(scale) * ct.type(self.rms_rate)
        variable.assign(variable.value.astype(ct, copy=False) - update)

    def _newton_schulz(self, x: Any, dt: Any) -> Any:
        """Approximate the orthogonal factor of ``x`` by quintic Newton-Schulz steps."""
        xp = get_array_module(x)
        a, b, c = dt(self.muon_a), dt(self.muon_b), dt(self.muon_c)
        tall = x.shape[-2] > x.shape[-1]
        if tall:
            x = xp.swapaxes(x, -2, -1)
        x = x / (xp.sqrt(xp.sum(x * x, axis=(-2, -1), keepdims=True)) + dt(1e-7))
        for _ in range(self.ns_steps):
            gram = x @ xp.swapaxes(x, -2, -1)
            x = a * x + (b * gram + c * gram @ gram) @ x
        return xp.swapaxes(x, -2, -1) if tall else x

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "adam_beta_1": self.adam_beta_1,
                "adam_beta_2": self.adam_beta_2,
                "epsilon": self.epsilon,
                "exclude_layers": self.exclude_layers,
                "muon_a": self.muon_a,
                "muon_b": self.muon_b,
                "muon_c": self.muon_c,
                "adam_lr_ratio": self.adam_lr_ratio,
                "momentum": self.momentum,
                "ns_steps": self.ns_steps,
                "nesterov": self.nesterov,
                "exclude_embeddings": self.exclude_embeddings,
                "adam_weight_decay": self.adam_weight_decay,
                "rms_rate": self.rms_rate,
            }
        )
        return config
