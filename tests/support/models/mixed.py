"""A small model of every kind the server core stores: a matrix, a vector, an embedding table
and a scalar, with gradients whose magnitudes vary widely."""

from __future__ import annotations

import numpy as np


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
