"""The fused GPU kernels on a GPU: every optimizer on CuPy takes the fused path and equals the
NumPy rule bit for bit (Ftrl: with its correctly rounded power). Skipped without a usable GPU.

The checks are test_gpu_kernels.py's, which runs them with the kernels' C on the CPU; here
the kernels run as NVRTC compiled them, and each launch is counted on its way to the device.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.optim_core import fused_gpu

from .test_fused import assert_bit_equal, make_problem
from .test_gpu_kernels import (
    CASES,
    DTYPES,
    FTRL_CASES,
    SLAB_CASES,
    check_ftrl,
    check_non_finite,
    check_rule,
    check_slab,
    run,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def cp() -> Any:
    if not optim_core.gpu_available():
        pytest.skip("no usable GPU (CuPy) on this machine")
    return optim_core.array_module("gpu")


@contextlib.contextmanager
def gpu_launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts fused_gpu's launches by kernel name; each still runs on the device."""
    launches: Counter[str] = Counter()
    real = fused_gpu._launch

    def counted(name: str, arrays: tuple[Any, ...], scalars: tuple[Any, ...]) -> None:
        launches[name] += 1
        real(name, arrays, scalars)

    with monkeypatch.context() as patch:
        patch.setattr(fused_gpu, "_launch", counted)
        yield launches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_numpy_rules(
    case: str, dtype: str, cp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_rule(case, dtype, gpu_launches(monkeypatch), cp)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy rule warns
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_values_propagate_alike(
    case: str, dtype: str, cp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_non_finite(case, dtype, gpu_launches(monkeypatch), cp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(FTRL_CASES))
def test_ftrl_kernel_matches_the_rule_with_a_correctly_rounded_power(
    case: str, dtype: str, cp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_ftrl(case, dtype, gpu_launches(monkeypatch), cp, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options", "kernel"), SLAB_CASES)
def test_a_slab_is_one_launch(
    name: str, options: dict, kernel: str, dtype: str, cp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_slab(name, options, kernel, dtype, gpu_launches(monkeypatch), "gpu")


@pytest.mark.parametrize("max_blocks", [None, 3])
def test_many_blocks_and_the_grid_stride_loop(
    max_blocks: int | None, cp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable of a million elements, in one element per thread or, with the grid capped at
    3 blocks, in a grid-stride loop: every element updated, as NumPy."""
    if max_blocks is not None:
        monkeypatch.setattr(fused_gpu, "_MAX_BLOCKS", max_blocks)
    init, stream = make_problem([((1 << 20) + 7,)], "float32", steps=3)
    with gpu_launches(monkeypatch) as launches:
        got = run("Adam", {"amsgrad": True}, init, stream, xp=cp)
    expected = run("Adam", {"amsgrad": True}, init, stream, fused=False)
    assert launches == {"adam_amsgrad": 3}
    for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        assert_bit_equal(a, b, "Adam")


def test_can_fuse_on_cupy(cp: Any) -> None:
    opt = optim_core.Adam()
    w = cp.ones((4, 8), cp.float32)
    assert fused_gpu.can_fuse(opt, w, cp.ones_like(w), cp.ones_like(w))
    assert fused_gpu.can_fuse(opt, w.astype(cp.float64), cp.ones((4, 8), cp.float64))
    assert fused_gpu.can_fuse(opt, cp.ones((), cp.float32), cp.ones((), cp.float32))
    assert not fused_gpu.can_fuse(opt, w.astype(cp.float16), cp.ones((4, 8), cp.float16))
    assert not fused_gpu.can_fuse(opt, w, cp.ones((4, 8), cp.float64))
    assert not fused_gpu.can_fuse(opt, w, cp.ones((8, 4), cp.float32))
    assert not fused_gpu.can_fuse(opt, w, cp.ones((4, 16), cp.float32)[:, ::2])
    assert not fused_gpu.can_fuse(opt, w, np.ones((4, 8), np.float32))
    assert not fused_gpu.can_fuse(opt, cp.ones((0,), cp.float32))
    opt.use_fused_kernels = False
    assert not fused_gpu.can_fuse(opt, w, cp.ones_like(w))


def test_non_contiguous_variable_falls_back(cp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A strided view runs the CuPy rule, leaving the other columns alone."""
    init, stream = make_problem([(30, 20)], "float32", steps=4)
    base = cp.full((30, 40), 7.0, cp.float32)
    base[:, ::2] = cp.asarray(init[0])
    view = base[:, ::2]
    opt = optim_core.Adam()
    with gpu_launches(monkeypatch) as launches:
        for grads in stream:
            opt.apply([cp.asarray(g) for g in grads], [view])
    assert sum(launches.values()) == 0
    expected = run("Adam", {}, init, stream, fused=False)
    np.testing.assert_allclose(cp.asnumpy(view), expected[0][0], rtol=1e-6)
    assert bool((base[:, 1::2] == 7.0).all())
