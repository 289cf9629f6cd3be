"""One dense layer trained with Adam; gradients are a pure function of ``(worker_id,
sequence)`` (plus the pulled weights in sync training), so a test can recompute every push a
server logged and replay it."""

from __future__ import annotations

import zlib

import numpy as np

SHAPES = {"dense/kernel": (16, 8), "dense/bias": (8,)}
ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def gradients(
    worker_id: str, sequence: int, weights: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Deterministic gradients with magnitudes from 1e-3 to 1e2, so that the order in which
    they are summed or applied shows in the bits; ``weights`` add a weight-dependent term."""
    rng = np.random.default_rng([zlib.crc32(worker_id.encode()), sequence])
    grads = {}
    for name, shape in SHAPES.items():
        magnitudes = 10.0 ** rng.integers(-3, 3, size=shape)
        grads[name] = (rng.standard_normal(shape) * magnitudes).astype(np.float32)
    if weights is not None:
        grads["dense/kernel"] += np.float32(0.5) * weights["dense/kernel"]
    return grads
