"""The Ray actor of bench/step.py's ``ray`` system: a parameter server as a Ray user writes it.

One actor process holds the weights (``socket_baseline.AdamState``: flat float32 weights and
Adam's slots); the worker calls ``actor.push.remote(grad)`` then
``ray.get(actor.pull.remote())``. Actor calls from one caller run in order, so the pull sees
the push. A gradient over Ray's inline limit (100 KiB) travels through the shared-memory
object store and reaches ``push`` as a read-only zero-copy array; ``pull``'s return value is
copied into the store and the worker gets a read-only array backed by it. The update is
paramserve's fused numba Adam, so the weights match optim_core's Adam bit for bit, as for
every system of the benchmark.

Imported by Ray's worker processes by module name: bench/step_systems.py puts this directory
on their ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from socket_baseline import AdamState


class ParamActor:
    """Weights and Adam state; ``push`` applies a gradient, ``pull`` returns the weights."""

    def __init__(self, weights: np.ndarray) -> None:
        from paramserve.optim_core import fused

        if not fused.available():
            raise RuntimeError("numba kernels unavailable: the actor needs fused.adam")
        self.adam = fused.adam
        self.state = AdamState(weights)

    def push(self, grad: np.ndarray) -> None:
        """One Adam step in place with ``grad`` (flat float32, read-only is fine)."""
        state = self.state
        self.adam(state.w, grad, state.m, state.v, *state.scalars())
        state.iterations += 1

    def pull(self) -> np.ndarray:
        """The current weights (Ray copies them into its object store on return)."""
        return self.state.w

    def pid(self) -> int:
        """The actor's process id, for the benchmark's CPU accounting."""
        return os.getpid()


_REMOTE: dict[str, Any] = {}


def remote_class(
    ray: Any, env: dict[str, str] | None = None, resources: dict[str, float] | None = None
) -> Any:
    """``ParamActor`` as a Ray actor class: one CPU, ``env`` in its process's environment,
    and ``resources`` (custom resources that place it on a given node)."""
    options: dict[str, Any] = {"num_cpus": 1}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    if resources:
        options["resources"] = dict(resources)
    key = repr(sorted(options.items()))
    if key not in _REMOTE:
        _REMOTE[key] = ray.remote(**options)(ParamActor)
    return _REMOTE[key]
