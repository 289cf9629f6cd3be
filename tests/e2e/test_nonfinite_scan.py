"""Non-finite gradients found while a push streams in, whatever the chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from paramserve.client import InvalidArgumentError
from tests.support.asserts import assert_same

N = 1000  # float32: 4000 bytes, in 6- and 64-byte chunks that split elements


@pytest.mark.parametrize("chunk_bytes", [6, 64])
@pytest.mark.parametrize("where", [0, 1, 500, N - 1])
def test_nonfinite_push_is_rejected_or_skipped(start_server, connect, chunk_bytes, where):
    weights = {"w": np.zeros(N, np.float32), "b": np.zeros(3, np.float32)}
    grad = np.ones(N, np.float32)
    grad[where] = np.nan
    for policy in ("reject", "skip"):
        client = connect(start_server(mode="async", nonfinite=policy), chunk_bytes=chunk_bytes)
        client.create_model(weights, "sgd")
        before = client.pull()
        if policy == "reject":
            with pytest.raises(InvalidArgumentError, match="'w' contains NaN"):
                client.push({"b": np.ones(3, np.float32), "w": grad})
        else:
            result = client.push({"b": np.ones(3, np.float32), "w": grad})
            assert not result.applied and not result.duplicate
        assert_same(client.pull(), before)
        assert client.push({"w": np.ones(N, np.float32)}).applied


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_whole_element_chunks_are_checked_as_they_are_copied(
    start_server, connect, monkeypatch, dtype, bad
):
    """Chunks of whole elements are copied and checked in one pass (wire.copy_checked);
    a NaN or Inf in any of them, or at a tensor's edge, is still found."""
    from paramserve import wire

    calls = []
    copy_checked = wire.copy_checked

    def spy(data, dst):
        calls.append(len(data))
        return copy_checked(data, dst)

    monkeypatch.setattr(wire, "copy_checked", spy)
    client = connect(start_server(mode="async"), chunk_bytes=256)
    weights = {"a": np.zeros(300, dtype), "b": np.zeros(200, dtype)}
    client.create_model(weights, "sgd")
    before = client.pull()
    for name, where in (("a", 0), ("a", 299), ("b", 0), ("b", 100), ("b", 199)):
        grad = {n: np.ones_like(v) for n, v in weights.items()}
        grad[name][where] = bad
        with pytest.raises(InvalidArgumentError, match=f"'{name}' contains"):
            client.push(grad)
    assert_same(client.pull(), before)
    assert calls and sum(calls) >= 5 * 500 * np.dtype(dtype).itemsize
    assert client.push({n: np.ones_like(v) for n, v in weights.items()}).applied
