"""Non-finite checks: gradients.all_finite (blocked) agrees with np.isfinite(x).all(), and
FiniteScan (while receiving) with a check of the whole tensor."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from paramserve import wire
from paramserve.server.errors import InvalidArgument
from paramserve.server.gradients import (
    FINITE_BLOCK_ELEMENTS,
    FiniteChecked,
    all_finite,
    check_push,
)
from paramserve.server.streams import FiniteScan, scan_segments
from paramserve.wire import SparseRows

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


def _scan(values: np.ndarray, piece_bytes: int) -> frozenset[str]:
    """FiniteScan over ``values`` delivered in ``piece_bytes`` pieces, as the servicer does."""
    header = wire.header_for("g", values)
    scan = FiniteScan(scan_segments(wire.StreamLayout([header])))
    payload = values.reshape(-1).view(np.uint8)
    for start in range(0, payload.size, piece_bytes):
        end = min(start + piece_bytes, payload.size)
        scan.update(payload, end)
    return scan.finite()


@pytest.mark.parametrize("piece_bytes", [1, 6, 4096, 1 << 20])
def test_scan_while_receiving_finds_values_split_across_pieces(piece_bytes):
    x = np.ones(1000, np.float64)
    assert _scan(x, piece_bytes) == {"g"}
    for where in (0, 1, 499, 999):
        y = x.copy()
        y[where] = np.inf
        assert _scan(y, piece_bytes) == frozenset()


def test_scan_skips_sparse_rows_and_check_push_rechecks_the_rest():
    rows = SparseRows(np.array([0], np.int64), np.array([[np.nan, 1.0]], np.float32))
    headers = [wire.header_for("d", np.ones(2, np.float32)), wire.sparse_header("s", rows, (3, 2))]
    scan = FiniteScan(scan_segments(wire.StreamLayout(headers)))
    scan.update(np.ones(2, np.float32).view(np.uint8), 8)
    assert scan.finite() == {"d"}
    specs = {"d": (np.dtype(np.float32), (2,)), "s": (np.dtype(np.float32), (3, 2))}
    # A name the scan vouched for is not read again; the others still are.
    grads = FiniteChecked({"d": np.array([np.nan, 0], np.float32)}, finite=frozenset({"d"}))
    assert check_push(grads, specs, nonfinite="reject", device="cpu", max_tensor_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match="'s' contains NaN"):
        check_push(
            FiniteChecked({"s": rows}, finite=scan.finite()),
            specs,
            nonfinite="reject",
            device="cpu",
            max_tensor_bytes=1 << 20,
        )
