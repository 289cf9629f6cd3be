"""gradients.all_finite: the blocked non-finite check agrees with np.isfinite(x).all()."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from paramserve.server.gradients import FINITE_BLOCK_ELEMENTS, all_finite

N = 2 * FINITE_BLOCK_ELEMENTS + 5  # two full blocks and a short one


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, FINITE_BLOCK_ELEMENTS - 1, FINITE_BLOCK_ELEMENTS, N - 1])
def test_blocked_check_finds_every_position(dtype, bad, where):
    x = np.ones(N, dtype=dtype)
    assert all_finite(x)
    x[where] = bad
    assert not all_finite(x)
    assert not all_finite(x.reshape(1, -1))


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((), np.float32),
        np.zeros(0, np.float32),
        np.ones((3, 4), np.float32),
        np.ones((4, N), np.float32)[:, ::2],  # not contiguous: the plain route
    ],
)
def test_small_empty_and_strided_arrays(x):
    assert all_finite(x)
    if x.size:
        x[(0,) * x.ndim] = np.nan
        assert not all_finite(x)
