"""A compressed pull of the whole model: each float32 slab run rounded by one cast into a
kept buffer, bit for bit what rounding each weight on its own gives."""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest

from paramserve.server import messages
from paramserve.server.store import Weights

BF16 = np.dtype(ml_dtypes.bfloat16)


def _model() -> tuple[Weights, dict, np.ndarray]:
    flat = (np.arange(40, dtype=np.float32) - 20) / np.float32(3)
    flat[5] = np.nan
    flat[6] = np.inf
    flat[7] = 1e30
    weights = Weights(
        {
            "a": flat[0:4],
            "s": flat[4:5].reshape(()),
            "b": flat[5:11].reshape(2, 3),
            "e": flat[11:11],
            "m": flat[11:40].reshape(29),
            "d": np.arange(3, dtype=np.float64) / 3,
            "lone": np.array([0.1, -0.2], np.float32),
        }
    )
    weights.runs = [(0, 5, flat, [0, 16, 20, 44, 44, 160])]
    specs = {n: (v.dtype.name, v.shape) for n, v in weights.items()}
    return weights, specs, flat


def _bits(tensors: dict) -> list:
    return [(n, v.dtype.str, v.shape, v.tobytes()) for n, v in tensors.items()]


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=str)
def test_rounded_runs_equal_rounding_each_weight(dtype):
    weights, specs, flat = _model()
    rounder = messages.WireWeights()
    first = None
    for _ in range(3):
        flat *= np.float32(1.5)  # the live weights change between pulls
        with np.errstate(all="ignore"):
            want = messages.compressed_weights(weights, specs, dtype)
        got, headers = rounder(specs, weights, dtype)
        assert _bits(got) == _bits(want)
        assert headers == messages.weight_headers(specs, want)
        assert got.runs[0][2].dtype == dtype and got.runs[0][3] == [0, 8, 10, 22, 22, 80]
        assert first is None or headers is first  # built once per model and dtype
        first = headers
    # A selection (not the whole model) is rounded one by one, as before.
    some = {"a": weights["a"], "d": weights["d"]}
    got, _ = rounder(specs, some, dtype)
    assert _bits(got) == _bits(messages.compressed_weights(some, specs, dtype))


def test_kept_buffers_go_with_the_model():
    weights, specs, _ = _model()
    rounder = messages.WireWeights()
    rounder(specs, weights, BF16)
    assert len(rounder._kept) == 1
    del weights
    gc.collect()
    assert len(rounder._kept) == 0


def test_pulls_of_unchanged_weights_round_once(monkeypatch):
    """The stripes of one pull (the store's weight-write count unchanged) reuse the rounded
    buffers; a new count rounds the changed weights again."""
    weights, specs, flat = _model()
    rounder = messages.WireWeights()
    casts = []
    cast_into = messages.wire.cast_into

    def counting(src, dst):
        casts.append(src.size)
        return cast_into(src, dst)

    monkeypatch.setattr(messages.wire, "cast_into", counting)
    first, _ = rounder(specs, weights, BF16, 7)
    again, _ = rounder(specs, weights, BF16, 7)
    assert len(casts) == 1 and _bits(again) == _bits(first)
    flat *= np.float32(1.5)
    got, _ = rounder(specs, weights, BF16, 8)
    assert len(casts) == 2
    with np.errstate(all="ignore"):
        assert _bits(got) == _bits(messages.compressed_weights(weights, specs, BF16))
    rounder(specs, weights, BF16)  # no count: rounded every time
    assert len(casts) == 3
