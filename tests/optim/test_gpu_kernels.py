"""The fused GPU kernels, checked without a GPU: their CUDA C source, run on the CPU, equals
the NumPy update rules bit for bit (test_gpu_kernel_ptx.py: NVRTC/nvcc compile it without
any contraction).

gpu_kernel_harness.py compiles the very strings NVRTC gets with gcc, and routes ``fused_gpu``
to them, so each optimizer runs its own GPU dispatch (scalars, argument order, kernel body)
on NumPy arrays. tests/optim/test_fused_gpu.py runs the same on a GPU when there is one.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.optim_core import ftrl, fused_gpu, gpu_kernels

from .gpu_kernel_harness import kernels_on_cpu, library, needs_gcc
from .test_fused import assert_bit_equal, make_problem
from .test_slabs import _arrays as slab_arrays
from .test_slabs import _assert_same
from .test_slabs import _flat as slab_flat
from .test_slabs import _grads as slab_grads
from .test_slabs import _run as run_slabs

STEPS = 12
DTYPES = ["float32", "float64"]
MODEL = [(7,), (40, 25), (1001,), (), (1,), (3, 0)]

# case: (class, config, the kernels every update launches once per non-empty variable)
CASES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "Adam": ("Adam", {}, ("adam",)),
    "Adam-amsgrad": ("Adam", {"amsgrad": True, "beta_1": 0.5}, ("adam_amsgrad",)),
    "AdamW": ("AdamW", {"weight_decay": 0.05}, ("weight_decay", "adam")),
    "Adam-ema": ("Adam", {"use_ema": True, "ema_momentum": 0.9}, ("adam", "ema")),
    "SGD": ("SGD", {"learning_rate": 0.1}, ("sgd",)),
    "SGD-momentum": ("SGD", {"momentum": 0.9}, ("sgd_momentum",)),
    "SGD-nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}, ("sgd_nesterov",)),
    "Lion": ("Lion", {"learning_rate": 0.01}, ("lion",)),
    "Lion-beta_1=1": ("Lion", {"beta_1": 1.0, "weight_decay": 0.1}, ("weight_decay", "lion")),
    "RMSprop": ("RMSprop", {}, ("rmsprop",)),
    "RMSprop-momentum": ("RMSprop", {"momentum": 0.9}, ("rmsprop_momentum",)),
    "RMSprop-centered": ("RMSprop", {"centered": True}, ("rmsprop_centered",)),
    "RMSprop-centered-momentum": (
        "RMSprop",
        {"centered": True, "momentum": 0.5, "rho": 0.8, "epsilon": 1e-4},
        ("rmsprop_centered_momentum",),
    ),
    "Adagrad": ("Adagrad", {"learning_rate": 0.1}, ("adagrad",)),
    "Adadelta": ("Adadelta", {"learning_rate": 1.0}, ("adadelta",)),
    "Adamax": ("Adamax", {"beta_1": 0.8, "beta_2": 0.99}, ("adamax",)),
    "Nadam": ("Nadam", {"learning_rate": 0.01}, ("nadam",)),
}
FTRL_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "l1-l2": {"l1_regularization_strength": 0.01, "l2_regularization_strength": 0.02},
    "shrinkage-beta-power": {
        "l2_shrinkage_regularization_strength": 0.05,
        "beta": 0.1,
        "learning_rate_power": -0.7,
    },
    "power-0": {"initial_accumulator_value": 0.5, "learning_rate_power": 0.0},
    "l1-only": {"l1_regularization_strength": 0.5, "learning_rate": 0.1},
}


def run(
    cls: str,
    config: dict[str, Any],
    init: list[np.ndarray],
    stream: list[list[np.ndarray]],
    *,
    xp: Any = np,
    fused: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Apply the stream to ``xp`` arrays; return host copies of the variables and of every
    optimizer variable."""
    variables = [xp.asarray(v.copy()) for v in init]
    opt = getattr(optim_core, cls)(**config)
    opt.use_fused_kernels = fused
    for grads in stream:
        opt.apply([xp.asarray(g) for g in grads], variables)
    return [optim_core.to_numpy(v).copy() for v in variables], [v.numpy() for v in opt.variables]


def assert_all_bit_equal(got: tuple[list, list], expected: tuple[list, list]) -> None:
    for i, (a, b) in enumerate(zip(got[0], expected[0], strict=True)):
        assert_bit_equal(a, b, f"variable {i}")
    for i, (a, b) in enumerate(zip(got[1], expected[1], strict=True)):
        assert_bit_equal(a, b, f"optimizer variable {i}")


# --- the checks, run here with the kernels on the CPU and in test_fused_gpu.py on a GPU -------
# ``kernels`` is a context manager that routes fused_gpu to the kernels under test and yields
# a Counter of launches by kernel name; ``xp`` the array module their arrays live in.


def check_rule(case: str, dtype: str, kernels: Any, xp: Any) -> None:
    """The kernels equal the NumPy rule bit for bit, one launch per variable and step."""
    cls, config, names = CASES[case]
    init, stream = make_problem(MODEL, dtype, steps=STEPS)
    with kernels as launches:
        got = run(cls, config, init, stream, xp=xp)
    expected = run(cls, config, init, stream, fused=False)
    assert_all_bit_equal(got, expected)
    non_empty = sum(1 for s in MODEL if int(np.prod(s)) > 0)
    assert launches == dict.fromkeys(names, STEPS * non_empty)


def check_non_finite(case: str, dtype: str, kernels: Any, xp: Any) -> None:
    """Infinities and NaNs in gradients, and -0.0 and inf in weights, end alike."""
    cls, config, names = CASES[case]
    init, stream = make_problem([(40,)], dtype, steps=6)
    stream[1][0][[0, 5]] = np.inf
    stream[2][0][[1, 5]] = -np.inf
    stream[3][0][[2, 9]] = np.nan
    init[0][[20, 21]] = [np.inf, -0.0]
    with kernels as launches:
        got = run(cls, config, init, stream, xp=xp)
    expected = run(cls, config, init, stream, fused=False)
    assert launches[names[-1]] == 6
    for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        np.testing.assert_array_equal(a, b, strict=True)
        # Signed zeros too (assert_array_equal counts -0.0 == 0.0); NaN signs may differ.
        number = ~np.isnan(b)
        assert np.array_equal(np.signbit(a)[number], np.signbit(b)[number])


def rounded_power(xp: Any, x: Any, p: Any) -> Any:
    """What the GPU kernel computes: float32 powers in float64, rounded once."""
    if x.dtype.itemsize >= 8:
        return xp.power(x, p)
    return xp.power(x.astype(np.float64), np.float64(p)).astype(x.dtype)


def check_ftrl(
    case: str, dtype: str, kernels: Any, xp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ftrl's kernel rounds a float64 power to float32 (as its CuPy rule does): equal to the
    NumPy rule computing its power that way. Only the float64 ``pow`` itself may differ in its
    last bit (the kernel's libm or CUDA, NumPy's own), amplified by Ftrl's cancellation; in
    float32 that difference vanishes in the rounding (but for about 1 in 2^28 powers)."""
    config = FTRL_CASES[case]
    init, stream = make_problem(MODEL, dtype, steps=STEPS)
    with kernels as launches:
        got = run("Ftrl", config, init, stream, xp=xp)
    with monkeypatch.context() as patch:
        patch.setattr(ftrl, "_power", rounded_power)
        expected = run("Ftrl", config, init, stream, fused=False)
    assert launches == {"ftrl": STEPS * 5}
    if dtype == "float32":
        assert_all_bit_equal(got, expected)
        return
    for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        # ~3e4 amplification (ftrl_pow_study.py) of a 1-2 ulp float64 pow: ~1e-11.
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


SLAB_CASES = [
    ("adam", {}, "adam"),
    ("adam", {"use_ema": True, "weight_decay": 0.1}, "adam"),
    ("sgd", {"momentum": 0.9}, "sgd_momentum"),
    ("lion", {}, "lion"),
    ("rmsprop", {"momentum": 0.5, "centered": True}, "rmsprop_centered_momentum"),
    ("nadam", {}, "nadam"),
]


def run_slab(
    name: str, options: dict, dtype: str, *, device: str | None
) -> tuple[optim_core.Optimizer, dict[str, np.ndarray]]:
    """test_slabs's five variables packed into one slab on ``device``, applied 4 steps."""
    arrays = {n: a.astype(dtype) for n, a in slab_arrays().items()}
    variables, slabs = optim_core.pack(list(arrays.items()), device=device)
    assert len(slabs) == 1
    xp = optim_core.array_module(device or "cpu")
    opt = optim_core.get({"class_name": name, "config": {"learning_rate": 0.01, **options}})
    opt.build(variables)  # built on the variables, it updates their slab whole from the start
    for step in range(4):
        opt.apply([xp.asarray(slab_flat(slabs[0], slab_grads(step, arrays)))], slabs)
    return opt, {v.path: optim_core.to_numpy(v.value).copy() for v in variables}


def check_slab(
    name: str, options: dict, kernel: str, dtype: str, kernels: Any, device: str | None
) -> None:
    """A slab of five variables updates in one launch per step, with the per-variable bits."""
    with kernels as launches:
        packed = run_slab(name, options, dtype, device=device)
    plain = run_slabs(name, options, packed=False, dtype=dtype, steps=4, fused=False)
    _assert_same(packed, plain)
    assert launches[kernel] == 4
    if options.get("use_ema"):
        assert launches["ema"] == 4 and launches["weight_decay"] == 4


# --- here: the kernels' C on the CPU ----------------------------------------------------------
@needs_gcc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_numpy_rules(
    case: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_rule(case, dtype, kernels_on_cpu(monkeypatch), np)


@needs_gcc
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy rule warns
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_values_propagate_alike(
    case: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_non_finite(case, dtype, kernels_on_cpu(monkeypatch), np)


@needs_gcc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(FTRL_CASES))
def test_ftrl_kernel_matches_the_rule_with_a_correctly_rounded_power(
    case: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_ftrl(case, dtype, kernels_on_cpu(monkeypatch), np, monkeypatch)


@needs_gcc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options", "kernel"), SLAB_CASES)
def test_a_slab_is_one_launch(
    name: str, options: dict, kernel: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_slab(name, options, kernel, dtype, kernels_on_cpu(monkeypatch), None)


SPECIAL = [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0, 0.25, -0.25, 5e-324]


@needs_gcc
@pytest.mark.parametrize("dtype", DTYPES)
def test_helpers_are_numpy_maximum_sign_and_clip(dtype: str) -> None:
    """Bit for bit on every pair of special values: signed zeros, NaNs, infinities."""
    lib = library(dtype, helpers=True)
    special = np.array(SPECIAL, dtype=dtype)  # 5e-324 becomes 0 in float32: still a zero
    a, b = (x.ravel().copy() for x in np.meshgrid(special, special))
    out = np.empty_like(a)
    n = ctypes.c_longlong(a.size)
    c_scalar = ctypes.c_float if dtype == "float32" else ctypes.c_double

    def bits(x: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(x), np.array(np.nan, dtype), x)  # any NaN is a NaN
        return x.view(f"u{x.itemsize}")

    def ptr(x: np.ndarray) -> ctypes.c_void_p:
        return ctypes.c_void_p(x.ctypes.data)

    lib.np_maximum_loop(ptr(a), ptr(b), ptr(out), n)
    np.testing.assert_array_equal(bits(out), bits(np.maximum(a, b)))
    lib.np_sign_loop(ptr(a), ptr(out), n)
    np.testing.assert_array_equal(bits(out), bits(np.sign(a)))
    for bound in (0.0, 0.25, 1.0):
        lo, hi = -np.array(bound, dtype), np.array(bound, dtype)
        lib.np_clip_loop(ptr(a), c_scalar(lo), c_scalar(hi), ptr(out), n)
        np.testing.assert_array_equal(bits(out), bits(np.clip(a, lo, hi)))


def test_ftrl_power_is_numpys_on_numpy_and_correctly_rounded_elsewhere() -> None:
    """Ftrl's xp rule: NumPy's own float32 power on NumPy (as Keras), and on another array
    module (CuPy) the float64 power rounded once, as its fused kernel computes it."""
    x = np.random.default_rng(2).uniform(0.01, 50.0, 10_000).astype(np.float32)
    p = np.float32(0.25)  # where NumPy's float32 power is often not correctly rounded
    other = type("OtherArrayModule", (), {"power": staticmethod(np.power)})()
    assert_bit_equal(ftrl._power(np, x, p), np.power(x, p), "numpy")
    assert_bit_equal(ftrl._power(other, x, p), rounded_power(np, x, p), "another module")
    x64 = x.astype(np.float64)
    assert_bit_equal(ftrl._power(other, x64, p), np.power(x64, p), "float64")


def test_can_fuse_refuses_numpy_without_importing_cupy() -> None:
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from paramserve import optim_core\n"
        "from paramserve.optim_core import fused_gpu\n"
        "w = np.ones(4, np.float32)\n"
        "opt = optim_core.Lion()\n"
        "opt.apply([np.ones(4, np.float32)], [w])\n"
        "assert not fused_gpu.can_fuse(opt, w, w, w)\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_every_public_kernel_function_names_a_table_entry() -> None:
    """fused_gpu launches only kernels the table defines, with their argument counts."""
    launched: list[tuple[str, int, int]] = []

    def record(name: str, arrays: tuple, scalars: tuple) -> None:
        launched.append((name, len(arrays), len(scalars)))

    a = np.zeros(3, np.float32)
    s = np.float32(0.5)
    import unittest.mock

    with unittest.mock.patch.object(fused_gpu, "_launch", record):
        fused_gpu.adam(a, a, a, a, s, s, s, s)
        fused_gpu.adam(a, a, a, a, s, s, s, s, v_hat=a)
        fused_gpu.sgd(a, a, s)
        fused_gpu.sgd_momentum(a, a, a, s, s, nesterov=False)
        fused_gpu.sgd_momentum(a, a, a, s, s, nesterov=True)
        fused_gpu.weight_decay(a, s, s)
        fused_gpu.ema(a, a, s, s)
        fused_gpu.lion(a, a, a, s, s, s, s, s)
        for avg in (None, a):
            for mom in (None, a):
                fused_gpu.rmsprop(a, a, a, s, s, s, s, average_gradient=avg, momentum=mom, mu=s)
        fused_gpu.adagrad(a, a, a, s, s)
        fused_gpu.adadelta(a, a, a, a, s, s, s, s)
        fused_gpu.adamax(a, a, a, a, s, s, s, s, s)
        fused_gpu.nadam(a, a, a, a, (s,) * 9)
        fused_gpu.ftrl(a, a, a, a, s, s, s, s, s)
    assert {name for name, _, _ in launched} == set(gpu_kernels.KERNELS)
    for name, arrays, scalars in launched:
        kernel = gpu_kernels.KERNELS[name]
        assert (arrays, scalars) == (len(kernel.arrays), len(kernel.scalars)), name
