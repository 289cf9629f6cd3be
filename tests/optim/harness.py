"""Runs one optimizer case in real Keras 3 (numpy backend) and in optim_core, step for step.

The reference numbers always come from Keras itself; nothing here computes an update.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from tests.support.optimizer_cases import build_keras_config, build_our_config

STEPS = 50

# One "model": every shape kind the suite must cover, incl. a scalar and empty arrays.
MIXED_SHAPES: dict[str, tuple[int, ...]] = {
    "dense/kernel": (5, 3),
    "dense/bias": (3,),
    "scalar": (),
    "empty": (0,),
    "conv": (2, 3, 4),
    "wide": (3, 6),
    "token_embedding": (4, 3),
    "empty_matrix": (0, 3),
}

SINGLE_SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "empty": (0,),
    "vector": (7,),
    "matrix": (5, 3),
    "wide_matrix": (3, 6),
    "tensor3": (2, 3, 4),
    "tensor4": (2, 2, 3, 2),
}


@dataclass
class RunResult:
    """Final model variables, optimizer variables (name, value) and iteration count."""

    variables: dict[str, np.ndarray]
    opt_variables: list[tuple[str, np.ndarray]]
    iterations: int
    first_step: dict[str, np.ndarray]


def make_stream(
    shapes: dict[str, tuple[int, ...]],
    harness: dict[str, Any],
    dtype: str,
    steps: int = STEPS,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], list[list[Any]]]:
    """Initial values and a gradient stream; entries are arrays, None, or ("rows", idx, vals)."""
    rng = np.random.default_rng(seed)
    init = {k: (rng.standard_normal(s) * 0.5).astype(dtype) for k, s in shapes.items()}
    names = list(shapes)
    sparse_target = next((k for k in names if len(shapes[k]) == 2 and shapes[k][0] > 0), None)
    stream = []
    for step in range(steps):
        grads: list[Any] = []
        for i, k in enumerate(names):
            g = rng.standard_normal(shapes[k]).astype(dtype)
            if i == 0 and step in harness.get("none_steps", ()):
                grads.append(None)
                continue
            if step in harness.get("nonfinite_steps", ()) and i == 0 and g.size:
                g.reshape(-1)[0] = np.inf
            if harness.get("sparse") and k == sparse_target:
                rows = shapes[k][0]
                idx = rng.integers(0, rows, size=rows + 2)  # repeats on purpose
                vals = rng.standard_normal((len(idx), *shapes[k][1:])).astype(dtype)
                grads.append(("rows", idx, vals))
                continue
            grads.append(g)
        stream.append(grads)
    return init, stream


def dense_rows(shape: tuple[int, ...], idx: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """The dense meaning of a row gradient (repeats summed), computed independently of us."""
    dense = np.zeros(shape, dtype=vals.dtype)
    np.add.at(dense, idx, vals)
    return dense


@functools.cache
def _keras() -> Any:
    import keras

    return keras


def _to_grad_for_keras(g: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(g, tuple):
        return dense_rows(shape, g[1], g[2])
    return g


def run_keras(
    class_name: str,
    config: dict[str, Any],
    init: dict[str, np.ndarray],
    stream: list[list[Any]],
) -> RunResult:
    """Run the case in real Keras and return host copies of everything."""
    keras = _keras()
    variables = []
    for path, value in init.items():
        scope, _, name = path.rpartition("/")
        if scope:
            with keras.name_scope(scope):
                variables.append(keras.Variable(value.copy(), name=name, dtype=value.dtype))
        else:
            variables.append(keras.Variable(value.copy(), name=name, dtype=value.dtype))
    opt = getattr(keras.optimizers, class_name)(**build_keras_config(config))
    first: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, grads in enumerate(stream):
            kgrads = [
                _to_grad_for_keras(g, v.shape) if g is not None else None
                for g, v in zip(grads, variables, strict=True)
            ]
            opt.apply(kgrads, variables)
            if step == 0:
                first = {p: np.array(v.numpy()) for p, v in zip(init, variables, strict=True)}
    return RunResult(
        variables={p: np.array(v.numpy()) for p, v in zip(init, variables, strict=True)},
        opt_variables=[(v.name, np.array(v.numpy())) for v in opt.variables],
        iterations=int(np.asarray(opt.iterations)),
        first_step=first,
    )


def run_ours(
    class_name: str,
    config: dict[str, Any],
    init: dict[str, np.ndarray],
    stream: list[list[Any]],
    *,
    xp: Any = np,
    fused: bool = True,
) -> RunResult:
    """Run the case in optim_core on ``xp`` arrays and return host copies of everything."""
    from paramserve import optim_core

    variables = [optim_core.Variable(xp.asarray(v.copy()), path=p) for p, v in init.items()]
    opt = getattr(optim_core, class_name)(**build_our_config(config))
    _set_fused(opt, fused)
    first: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, grads in enumerate(stream):
            ours = []
            for g in grads:
                if g is None:
                    ours.append(None)
                elif isinstance(g, tuple):
                    ours.append(optim_core.IndexedSlices(xp.asarray(g[1]), xp.asarray(g[2])))
                else:
                    ours.append(xp.asarray(g))
            opt.apply(ours, variables)
            if step == 0:
                first = {
                    p: optim_core.to_numpy(v.value).copy()
                    for p, v in zip(init, variables, strict=True)
                }
    return RunResult(
        variables={
            p: optim_core.to_numpy(v.value).copy() for p, v in zip(init, variables, strict=True)
        },
        opt_variables=[(v.name, v.numpy()) for v in opt.variables],
        iterations=int(opt.iterations),
        first_step=first,
    )


def _set_fused(opt: Any, fused: bool) -> None:
    opt.use_fused_kernels = fused
    inner = getattr(opt, "inner_optimizer", None)
    if inner is not None:
        inner.use_fused_kernels = fused
