"""Shared helpers for the server-core tests: models, gradients, a local optim_core replay."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserve import optim_core
from paramserve.optim_core import Variable


def model_vars(seed: int = 0) -> dict[str, np.ndarray]:
    """A small model: a matrix, a vector, an embedding table and a scalar."""
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((4, 3)).astype(np.float32),
        "dense/bias": rng.standard_normal(3).astype(np.float32),
        "emb": rng.standard_normal((10, 2)).astype(np.float32),
        "scale": np.array(0.5, dtype=np.float32),
    }


def grads_for(variables: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Gradients whose magnitudes vary widely, so float summation order shows in the bits."""
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for name, value in variables.items():
        mags = 10.0 ** rng.integers(-3, 4, size=value.shape)
        out[name] = np.asarray(rng.standard_normal(value.shape) * mags).astype(value.dtype)
    return out


class LocalReplay:
    """The same optimizer run locally with optim_core, as a bit-exact reference."""

    def __init__(self, optimizer: Any, variables: dict[str, np.ndarray]) -> None:
        self.opt = optim_core.get(optimizer)
        self.vars = {n: Variable(np.array(a, copy=True), path=n) for n, a in variables.items()}
        self.opt.build(list(self.vars.values()))

    def apply(self, grads: dict[str, Any]) -> None:
        names = list(grads)
        self.opt.apply([grads[n] for n in names], [self.vars[n] for n in names])

    def weights(self) -> dict[str, np.ndarray]:
        return {n: v.numpy() for n, v in self.vars.items()}


def assert_bitwise_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name}: {a} != {b}"


def assert_state_equal(a: tuple[int, list], b: tuple[int, list]) -> None:
    assert a[0] == b[0]
    assert [k for k, _ in a[1]] == [k for k, _ in b[1]]
    for (_, x), (_, y) in zip(a[1], b[1], strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)
