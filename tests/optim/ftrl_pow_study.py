"""How far Ftrl drifts from Keras when ``pow`` is not NumPy's own (the GPU's case), on the CPU.

Keras's numpy backend computes Ftrl's ``n'^-p - n^-p`` with NumPy's float32 ``power``, which on
an AVX-512 machine is a SIMD (SVML) routine that is not correctly rounded; CuPy uses CUDA's
``powf``. The difference of two nearly equal powers cancels, so a 1-ulp difference of ``pow``
becomes a large relative difference of ``sigma`` and, through ``z``, of ``w``. This runs every
Ftrl case of the conformance option matrix (float32, the stored Keras references) with
``pow`` replaced by each of several accurate implementations (and with the fused GPU kernel,
its CUDA C run on the CPU) and prints, per variant, the worst relative error against Keras,
the smallest ``rtol`` (at the suite's ``atol`` of 1e-5) that would pass, and how many cases
fail the suite's GPU tolerance. Run from the repository root in the test environment::

    .venv/bin/python -m tests.optim.ftrl_pow_study
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tests.optim.gpu_kernel_harness import kernels_on_cpu

os.environ.setdefault("KERAS_BACKEND", "numpy")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ATOL = 1e-5
GPU_RTOL = 1e-4  # tests/optim/test_conformance.py's tolerance for CuPy in float32


def _libm_powf() -> Callable[[np.ndarray, Any], np.ndarray]:
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.powf.restype = ctypes.c_float
    libm.powf.argtypes = (ctypes.c_float, ctypes.c_float)

    def powf(x: np.ndarray, p: Any) -> np.ndarray:
        x = np.asarray(x)
        flat = [libm.powf(float(v), float(p)) for v in x.reshape(-1)]
        return np.asarray(flat, dtype=x.dtype).reshape(x.shape)

    return powf


def _rounded_f64(x: np.ndarray, p: Any) -> np.ndarray:
    """float32 pow as float64 pow rounded once to float32: correctly rounded in all but
    astronomically rare cases (a float64 result within 2^-29 ulp of a float32 midpoint)."""
    x = np.asarray(x)
    return np.power(x.astype(np.float64), np.float64(p)).astype(x.dtype)


def _ulp_noise(ulps: int, seed: int = 0) -> Callable[[np.ndarray, Any], np.ndarray]:
    """Correctly rounded pow moved by a random whole number of ulps in [-ulps, ulps]."""
    rng = np.random.default_rng(seed)

    def noisy(x: np.ndarray, p: Any) -> np.ndarray:
        exact = _rounded_f64(x, p)
        steps = rng.integers(-ulps, ulps + 1, size=exact.shape)
        out = exact.copy().reshape(-1)
        for k, s in enumerate(steps.reshape(-1)):
            for _ in range(abs(int(s))):
                out[k] = np.nextafter(out[k], np.inf if s > 0 else -np.inf, dtype=out.dtype)
        return out.reshape(exact.shape)

    return noisy


VARIANTS: dict[str, Callable[[np.ndarray, Any], np.ndarray] | None] = {
    "numpy (as Keras)": np.power,
    "float64 pow rounded to float32": _rounded_f64,
    "glibc powf": _libm_powf(),
    "correctly rounded +-1 ulp": _ulp_noise(1),
    "correctly rounded +-2 ulp": _ulp_noise(2),
    "fused GPU kernel (C on the CPU)": None,
}


@contextlib.contextmanager
def pow_replaced(power: Callable[[np.ndarray, Any], np.ndarray] | None) -> Iterator[None]:
    """Ftrl's rule with ``power`` for its powers (None: the fused GPU kernel instead, its
    CUDA C run on the CPU by tests/optim/gpu_kernel_harness.py)."""
    from paramserve.optim_core import ftrl

    with pytest.MonkeyPatch.context() as patch:
        if power is None:
            with kernels_on_cpu(patch):
                yield
            return
        patch.setattr(ftrl, "_power", lambda xp, x, p: power(x, p))
        yield


def needed_rtol(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(worst relative error where |ref| > atol, smallest rtol passing at ATOL)."""
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if a.size == 0:
        return 0.0, 0.0
    diff = np.abs(a - b)
    big = np.abs(b) > ATOL
    rel = float(np.max(diff[big] / np.abs(b[big]))) if big.any() else 0.0
    excess = diff - ATOL
    need = excess[excess > 0] / np.maximum(np.abs(b[excess > 0]), 1e-300)
    return rel, float(need.max()) if need.size else 0.0


def study_case(case_id: str) -> dict[str, tuple[float, float]]:
    from tests.optim import references
    from tests.optim.harness import run_ours

    job = references.Job(case_id, "mixed", "float32")
    ref, (init, stream) = references.keras_result(job)
    class_name, config, _, _ = job.lookup()
    out = {}
    for label, power in VARIANTS.items():
        with pow_replaced(power):
            ours = run_ours(class_name, config, init, stream, fused=power is None)
        pairs = [(ours.variables[p], v) for p, v in ref.variables.items()]
        pairs += [(ours.first_step[p], v) for p, v in ref.first_step.items()]
        slots = zip(ours.opt_variables, ref.opt_variables, strict=True)
        pairs += [(a, b) for (_, a), (_, b) in slots]
        worst = [needed_rtol(a, b) for a, b in pairs if a.dtype.kind == "f"]
        out[label] = (max(w[0] for w in worst), max(w[1] for w in worst))
    return out


def pow_mismatch(p: float) -> str:
    """How often NumPy's float32 power differs from the correctly rounded result."""
    x = np.random.default_rng(1).uniform(0.05, 60.0, 200_000).astype(np.float32)
    exact = _rounded_f64(x, np.float32(p))
    numpy_ = np.power(x, np.float32(p))
    differ = np.mean(numpy_ != exact)
    return f"p={p}: NumPy float32 power != correctly rounded for {differ:.1%} of inputs"


def main() -> int:
    from tests.support.optimizer_cases import all_cases

    cases = [cid for cid, cls, _, _ in all_cases() if cls == "Ftrl"]
    for p in (0.25, 0.5, 0.7):
        print(pow_mismatch(p))
    print(f"{len(cases)} Ftrl cases; worst relative error / smallest passing rtol at atol={ATOL}")
    totals: dict[str, list[float]] = {label: [0.0, 0.0, 0] for label in VARIANTS}
    for case_id in cases:
        print(case_id)
        for label, (rel, rtol) in study_case(case_id).items():
            print(f"    {label:<32} rel {rel:9.2e}   rtol needed {rtol:9.2e}")
            worst_rel, worst_rtol, failing = totals[label]
            totals[label] = [
                max(worst_rel, rel),
                max(worst_rtol, rtol),
                failing + (rtol > GPU_RTOL),
            ]
    print(f"worst over all cases; cases failing the suite's GPU tolerance (rtol {GPU_RTOL})")
    for label, (rel, rtol, failing) in totals.items():
        print(f"    {label:<32} rel {rel:9.2e}   rtol needed {rtol:9.2e}   failing {failing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
