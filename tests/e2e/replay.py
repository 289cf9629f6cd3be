"""Local replays of what a server should have computed, with optim_core directly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from paramserve import optim_core
from paramserve.client import SparseRows


def combine(pushes: Sequence[Mapping[str, Any]], *, reduction: str) -> dict[str, Any]:
    """The contract's reduction: per variable, left to right in the given (sorted worker
    id) order, in the variable dtype; sparse rows concatenate; mean divides by the count."""
    names = list(dict.fromkeys(n for push in pushes for n in push))
    out: dict[str, Any] = {}
    for name in names:
        parts = [push[name] for push in pushes if name in push]
        if isinstance(parts[0], SparseRows):
            value: Any = SparseRows(
                np.concatenate([p.indices for p in parts]),
                np.concatenate([p.values for p in parts]),
            )
        else:
            value = parts[0]
            for part in parts[1:]:
                value = value + part
        if reduction == "mean" and len(pushes) > 1:
            n = np.float32(len(pushes))
            value = (
                SparseRows(value.indices, value.values / n)
                if isinstance(value, SparseRows)
                else value / n
            )
        out[name] = value
    return out


class LocalModel:
    """Variables named like the server's, and an optimizer built from the server's config."""

    def __init__(self, weights: Mapping[str, np.ndarray], optimizer_config: dict[str, Any]):
        self.variables = {
            n: optim_core.Variable(np.array(w, copy=True), path=n) for n, w in weights.items()
        }
        self.optimizer = optim_core.deserialize(optimizer_config)
        self.optimizer.build(list(self.variables.values()))

    def weights(self) -> dict[str, np.ndarray]:
        return {n: v.numpy() for n, v in self.variables.items()}

    def apply(self, grads: Mapping[str, Any]) -> None:
        values = [
            optim_core.IndexedSlices(g.indices, g.values) if isinstance(g, SparseRows) else g
            for g in grads.values()
        ]
        self.optimizer.apply(values, [self.variables[n] for n in grads])


def assert_same(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    """Same names, dtypes, shapes and bits."""
    assert list(actual) == list(expected)
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert a.tobytes() == e.tobytes(), f"{name}: max |diff| {np.max(np.abs(a - e))}"
