"""A dense layer and an embedding table; gradients are a pure function of ``(worker_id, step,
weights)``, so a test can replay exactly what the workers pushed and compare bit for bit."""

from __future__ import annotations

import zlib

import numpy as np

from paramserve.client import SparseRows

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (3,), "embedding": (8, 4)}
SPARSE = "embedding"


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def known_gradients(
    worker_id: str, step: int, weights: dict[str, np.ndarray], *, sparse: bool = True
) -> dict[str, np.ndarray | SparseRows]:
    """Deterministic gradients; the dense ones depend on the pulled weights too."""
    rng = np.random.default_rng([zlib.crc32(worker_id.encode()), step])
    grads: dict[str, np.ndarray | SparseRows] = {
        "dense/kernel": (
            np.float32(0.5) * weights["dense/kernel"]
            + rng.normal(size=SHAPES["dense/kernel"]).astype(np.float32)
        ),
        "dense/bias": rng.normal(size=SHAPES["dense/bias"]).astype(np.float32),
    }
    if sparse:
        rows = SHAPES[SPARSE][0]
        indices = rng.integers(0, rows, 3)  # repeats happen, and must be summed
        values = rng.normal(size=(3, SHAPES[SPARSE][1])).astype(np.float32)
        grads[SPARSE] = SparseRows(indices.astype(np.int64), values)
    return grads
