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
