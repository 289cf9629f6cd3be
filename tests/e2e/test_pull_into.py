"""``Client.pull(out=...)``: weights received straight into the caller's arrays."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.asserts import assert_same
from tests.support.models.embedding import initial_weights

SGD = {"class_name": "SGD", "config": {"learning_rate": 0.5}}


@pytest.fixture
def client(start_server, connect):
    client = connect(start_server(mode="async"), chunk_bytes=32)  # several chunks per tensor
    client.create_model(initial_weights(), SGD)
    client.push({n: np.ones_like(w) for n, w in initial_weights().items()})
    return client


def test_pull_into_caller_arrays(client):
    expected = client.pull()
    out = {"dense/kernel": np.zeros((5, 3), np.float32), "embedding": np.zeros((8, 4), np.float32)}
    kernel, embedding = out["dense/kernel"], out["embedding"]
    weights = client.pull(out=out)
    assert weights["dense/kernel"] is kernel and weights["embedding"] is embedding
    assert weights.version == expected.version == 1
    assert_same(weights, expected)  # dense/bias, not in out, arrives in a fresh array


def test_pull_into_refuses_arrays_that_do_not_fit(client):
    before = client.pull()
    bad = [
        {"dense/bias": np.zeros(3, np.float64)},  # dtype
        {"dense/bias": np.zeros(4, np.float32)},  # shape
        {"dense/kernel": np.zeros((3, 5), np.float32).T},  # not C-contiguous
    ]
    for out in bad:
        with pytest.raises(ValueError, match="dense/"):
            client.pull(out=out)
    with pytest.raises(TypeError):
        client.pull(out={"dense/bias": [0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="rows"):
        client.pull(rows={"embedding": [1]}, out={"embedding": np.zeros((8, 4), np.float32)})
    assert_same(client.pull(), before)
