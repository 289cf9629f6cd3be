"""A small model and its gradients for the sharded-job tests (shared with worker processes)."""

from __future__ import annotations

import numpy as np

SHAPES = {
    "embedding": (30, 4),
    "dense/kernel": (4, 3),
    "dense/bias": (3,),
    "out/kernel": (3, 2),
}
# The embedding (480 bytes) is split by rows across the shards; the rest is whole.
SPLIT_BYTES = 256


def shard_initial(seed: int = 0) -> dict[str, np.ndarray]:
    """Initial weights."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def shard_gradients(seed: int) -> dict[str, np.ndarray]:
    """Dense gradients for every variable, one set per seed."""
    rng = np.random.default_rng(10_000 + seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
