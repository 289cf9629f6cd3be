"""Conformance: every optimizer x option x shape x backend matches real Keras 3.15.1.

Each case runs 50 steps in Keras (numpy backend) and in optim_core from the same initial
values and gradients, then compares model variables, every optimizer variable (names and
values, in Keras order) and the iteration count.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import pytest

from paramserve import optim_core
from tests.support.optimizer_cases import CLASS_NAMES

from . import references
from .harness import SINGLE_SHAPES, RunResult, run_ours

CASES = references.CASES

# Keras auto-names Nadam's product variable uniquely per process ("variable", "variable_1",
# ...), so for those only the position is compared.
UNSTABLE_NAME = re.compile(r"variable(_\d+)?")


def _backends() -> list[Any]:
    return [
        pytest.param("numpy", id="numpy"),
        pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
    ]


def _xp(backend: str) -> Any:
    if backend == "numpy":
        return np
    if not optim_core.gpu_available():
        pytest.skip("no usable GPU (CuPy) on this machine")
    return optim_core.array_module("gpu")


def tolerance(dtype: str, backend: str) -> dict[str, float]:
    """Exact on NumPy float32; float32 round-off elsewhere (other dtypes, the GPU)."""
    if dtype == "float64":
        # Keras's numpy backend demotes float64 operands to float32 in nearly every binary op
        # (keras/src/backend/common/dtypes.py); we compute in real float64, so the reference
        # only carries float32 precision, and Ftrl (w recomputed from z each step) amplifies
        # that rounding to ~1e-4 relative over 50 steps.
        return {"rtol": 5e-4, "atol": 1e-5}
    if dtype in ("float16", "bfloat16"):
        return {"rtol": 2e-2, "atol": 2e-2}
    if backend == "cupy":
        # Ftrl passes here too, though its n'^p - n^p cancels (a 1-ulp error of one power
        # moves w by up to ~1e-3 relative over 50 steps): its powers are correctly rounded on
        # CuPy (ftrl._power, the fused kernel), which puts it within 7.9e-7 of Keras (CUDA's
        # powf was measured 4e-4 away on a GPU). tests/optim/ftrl_pow_study.py measures it.
        return {"rtol": 1e-4, "atol": 1e-5}
    # NumPy float32: every optimizer reproduces Keras bit for bit (same float32 operations in
    # the same order), so nothing short of equality passes.
    return {"rtol": 0.0, "atol": 0.0}


def assert_matches(ours: RunResult, ref: RunResult, tol: dict[str, float]) -> None:
    """Names, order, shapes and values of everything Keras exposes must agree."""
    assert ours.iterations == ref.iterations
    for path, ref_value in ref.first_step.items():
        np.testing.assert_allclose(
            ours.first_step[path].astype(np.float64),
            ref_value.astype(np.float64),
            **tol,
            err_msg=f"variable {path} after the first step",
        )
    for path, ref_value in ref.variables.items():
        np.testing.assert_allclose(
            ours.variables[path].astype(np.float64),
            ref_value.astype(np.float64),
            **tol,
            err_msg=f"variable {path} after {len(ref.first_step) and 50} steps",
        )
    our_names = [n for n, _ in ours.opt_variables]
    ref_names = [n for n, _ in ref.opt_variables]
    assert len(our_names) == len(ref_names), (our_names, ref_names)
    for (name, value), (ref_name, ref_value) in zip(
        ours.opt_variables, ref.opt_variables, strict=True
    ):
        if not UNSTABLE_NAME.fullmatch(ref_name):
            assert name == ref_name, (our_names, ref_names)
        assert value.shape == ref_value.shape, (name, value.shape, ref_value.shape)
        assert value.dtype == ref_value.dtype, (name, value.dtype, ref_value.dtype)
        np.testing.assert_allclose(
            value.astype(np.float64), ref_value.astype(np.float64), **tol, err_msg=f"slot {name}"
        )


@functools.cache
def _keras_result(case_id: str, shapes_key: str, dtype: str) -> tuple[RunResult, Any]:
    """Keras's result (stored by tests/optim/record_references.py, or live) and the inputs."""
    return references.keras_result(references.Job(case_id, shapes_key, dtype))


def _lookup(case_id: str, shapes_key: str) -> tuple[str, dict, dict, dict]:
    return references.Job(case_id, shapes_key, "float32").lookup()


def _check(case_id: str, shapes_key: str, dtype: str, backend: str) -> None:
    xp = _xp(backend)
    ref, (init, stream) = _keras_result(case_id, shapes_key, dtype)
    class_name, config, _, _ = _lookup(case_id, shapes_key)
    ours = run_ours(class_name, config, init, stream, xp=xp)
    assert_matches(ours, ref, tolerance(dtype, backend))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_option_matrix(case_id: str, backend: str) -> None:
    """Every optimizer x option combination on a model with every shape kind."""
    _check(case_id, "mixed", "float32", backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", list(SINGLE_SHAPES))
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_shapes(class_name: str, shape: str, backend: str) -> None:
    """Every optimizer on each shape alone, including a scalar and an empty array."""
    _check(class_name, shape, "float32", backend)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_dtypes(class_name: str, dtype: str) -> None:
    """Other float dtypes: slots and results in that dtype; values as Keras within its precision."""
    if dtype == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16).name
    _check(class_name, "mixed", dtype, "numpy")


def test_registry_is_the_implemented_set() -> None:
    """A new optimizer cannot be added without joining the registry and this suite."""
    implemented = {
        cls
        for cls in vars(optim_core).values()
        if isinstance(cls, type)
        and issubclass(cls, optim_core.Optimizer)
        and cls is not optim_core.Optimizer
    }
    registered = {
        cls
        for cls in optim_core.registered_optimizers().values()
        if cls.__module__.startswith("paramserve.optim_core")
    }
    assert registered == implemented == set(optim_core.BUILTIN_OPTIMIZERS)
    assert {c.__name__ for c in implemented} == set(CLASS_NAMES)
