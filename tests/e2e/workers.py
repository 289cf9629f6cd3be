"""Worker bodies run in spawned processes by the e2e tests, and the gradients they push.

The gradients are a pure function of ``(worker_id, step, weights)``, so a test can replay
exactly what the workers pushed with a local optim_core optimizer and compare bit for bit.
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from paramserve.client import Client, SparseRows

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (3,), "embedding": (8, 4)}
SPARSE = "embedding"
TIMEOUT_S = 30.0


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


def sync_worker(
    address: str, worker_id: str, first_step: int, steps: int, sparse: bool = True
) -> dict[str, np.ndarray]:
    """Pull version ``step``, push its gradients, for each step; returns the final weights."""
    with Client(address, worker_id=worker_id, timeout_s=TIMEOUT_S) as client:
        for step in range(first_step, first_step + steps):
            weights = client.pull(min_version=step)
            assert weights.version == step, (weights.version, step)
            result = client.push(known_gradients(worker_id, step, weights, sparse=sparse))
            assert result.version == step + 1 and not result.duplicate, result
        return dict(client.pull(min_version=first_step + steps))


def async_worker(address: str, worker_id: str, pushes: int) -> list[tuple[int, int]]:
    """Push gradients that ignore the weights; returns ``(version after, step)`` per push."""
    zeros = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    out = []
    with Client(address, worker_id=worker_id, timeout_s=TIMEOUT_S) as client:
        for step in range(pushes):
            result = client.push(known_gradients(worker_id, step, zeros, sparse=False))
            assert not result.duplicate
            out.append((result.version, step))
    return out


def stale_worker(address: str, worker_id: str, pushes: int) -> list[float]:
    """Push as fast as allowed; returns the time each push returned."""
    zeros = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    done = []
    with Client(address, worker_id=worker_id, timeout_s=TIMEOUT_S) as client:
        for step in range(pushes):
            client.push(known_gradients(worker_id, step, zeros, sparse=False))
            done.append(time.monotonic())
    return done
