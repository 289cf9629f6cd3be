"""Two small variables (``w`` 2x3, ``b`` 2) and SGD: easy to reason about in raw-stub tests."""

from __future__ import annotations

import json

import numpy as np

SGD_JSON = json.dumps({"class_name": "SGD", "config": {"learning_rate": 0.5}})


def initial_variables() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([0.5, -0.5], dtype=np.float32),
    }


def grads_for(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), scale, dtype=np.float32),
        "b": np.array([scale, 2 * scale], dtype=np.float32),
    }
