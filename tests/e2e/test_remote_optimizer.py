"""RemoteOptimizer: Keras-style code against a server trains exactly like optim_core locally."""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import RemoteOptimizer
from paramserve.server.demo import forward_backward, init_params, spirals
from tests.support.asserts import assert_same

OPTIMIZER = {"class_name": "Adam", "config": {"learning_rate": 0.01, "amsgrad": True}}


def batches(steps: int, size: int = 48):
    x, labels = spirals(3, points_per_class=100)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        rows = rng.integers(0, len(x), size)
        yield x[rows], labels[rows]


def train(optimizer, variables: list, steps: int) -> list[float]:
    """The same Keras-style loop for both optimizers (arrays or Variables wrapping them)."""
    arrays = [v.value if isinstance(v, optim_core.Variable) else v for v in variables]
    losses = []
    for x, labels in batches(steps):
        loss, _, grads = forward_backward(arrays, x, labels)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        losses.append(loss)
    return losses


@pytest.fixture
def pair(start_server, connect):
    """A remote optimizer with its params, and a local one with a copy of them."""
    server = start_server(mode="sync", replicas=1)
    client = connect(server)
    weights = init_params(5)
    client.create_model(weights, OPTIMIZER)
    remote_params = [w.copy() for w in weights.values()]
    local_vars = [optim_core.Variable(w.copy(), path=n) for n, w in weights.items()]
    local = optim_core.deserialize(OPTIMIZER)
    local.build(local_vars)
    remote = RemoteOptimizer(client)
    # Two biases share a shape: plain arrays are paired by an explicit {name: array} mapping.
    remote.build(dict(zip(weights, remote_params, strict=True)))
    return remote, remote_params, local, local_vars


def test_training_matches_local_optim_core_bit_for_bit(pair):
    remote, params, local, local_vars = pair
    remote_losses = train(remote, params, 15)
    local_losses = train(local, local_vars, 15)
    assert remote_losses == local_losses
    assert remote_losses[-1] < remote_losses[0]
    names = [v.path for v in local_vars]
    assert_same(dict(zip(names, params, strict=True)), {v.path: v.value for v in local_vars})
    assert remote.iterations == local.iterations == 15
    assert remote.get_config() == local.get_config()
    assert [(s.name, s.shape) for s in remote.variables] == [
        (v.name, v.shape) for v in local.variables
    ]


def test_weights_round_trip_and_learning_rate_change(pair):
    remote, params, local, local_vars = pair
    train(remote, params, 3)
    train(local, local_vars, 3)
    remote_state, local_state = remote.get_weights(), local.get_weights()
    assert len(remote_state) == len(local_state)
    for r, s in zip(remote_state, local_state, strict=True):
        assert r.dtype == s.dtype and r.tobytes() == s.tobytes()

    changed = [w if w.ndim == 0 else w * np.float32(0.5) for w in remote_state]
    remote.set_weights(changed)
    local.set_weights(changed)
    for r, s in zip(remote.get_weights(), changed, strict=True):
        assert r.tobytes() == s.tobytes()

    remote.learning_rate = 0.003
    local.learning_rate = 0.003
    assert remote.learning_rate == local.learning_rate == np.float32(0.003)
    train(remote, params, 4)
    train(local, local_vars, 4)
    for p, v in zip(params, local_vars, strict=True):
        assert p.tobytes() == v.value.tobytes()
    with pytest.raises(ValueError, match="expects"):
        remote.set_weights(changed[:-1])


def test_variables_match_by_path_and_subsets_work(pair):
    remote, params, local, local_vars = pair
    # optim_core Variables whose paths name server variables, in any order.
    paired = zip(params, local_vars, strict=True)
    shuffled = [optim_core.Variable(p, path=v.path) for p, v in paired][::-1]
    grads = [np.ones_like(v.value) for v in shuffled]
    version = remote.apply(grads, shuffled)
    local.apply([np.ones_like(v.value) for v in local_vars[::-1]], local_vars[::-1])
    assert version == 1
    # A subset, and a None gradient (Keras warns and skips it; the array is still refreshed).
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        remote.apply([np.ones_like(params[0]), None], [shuffled[-1], shuffled[-2]])
    local.apply([np.ones_like(params[0])], [local_vars[0]])
    for p, v in zip(params, local_vars, strict=True):
        assert p.tobytes() == v.value.tobytes()
    with pytest.raises(ValueError, match="Unknown variable"):
        remote.apply([np.ones(3, np.float32)], [np.zeros(3, np.float32)])


def test_plain_arrays_that_share_a_shape_are_refused_before_anything_is_pushed(
    start_server, connect
):
    server = start_server(mode="async")
    client = connect(server)
    weights = init_params(5)  # dense_1/bias and dense_2/bias are both float32 [64]
    client.create_model(weights, OPTIMIZER)
    before = client.pull()
    arrays = [w.copy() for w in weights.values()]
    remote = RemoteOptimizer(client)
    with pytest.raises(ValueError, match="2 \\(\\['dense_1/bias', 'dense_2/bias'\\]\\) server"):
        remote.apply_gradients(zip([np.ones_like(a) for a in arrays], arrays, strict=True))
    assert client.status().version == 0
    assert_same(client.pull(), before)
    # In another order, but Variables named by their path: each gradient reaches its own.
    names = list(weights)[::-1]
    variables = [optim_core.Variable(weights[n].copy(), path=n) for n in names]
    grads = [np.full_like(v.value, i + 1) for i, v in enumerate(variables)]
    RemoteOptimizer(client).apply(grads, variables)
    local_vars = [optim_core.Variable(weights[n].copy(), path=n) for n in names]
    local = optim_core.deserialize(OPTIMIZER)
    local.apply([np.full_like(v.value, i + 1) for i, v in enumerate(local_vars)], local_vars)
    assert_same({v.path: v.value for v in variables}, {v.path: v.value for v in local_vars})
    assert_same(client.pull(names), {v.path: v.value for v in local_vars})


@pytest.mark.parametrize(
    "bad",
    [
        lambda w: np.frombuffer(w.tobytes(), w.dtype).reshape(w.shape),  # read-only
        lambda w: _ArrayLike(w),  # array-like, but not writable in place (e.g. keras.Variable)
    ],
    ids=["read-only", "array-like"],
)
def test_variables_that_cannot_be_written_are_refused_before_the_push(start_server, connect, bad):
    server = start_server(mode="async")
    client = connect(server)
    weights = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    client.create_model(weights, OPTIMIZER)
    variables = [weights["w"].copy(), bad(weights["b"])]
    grads = [np.ones(np.shape(v), np.float32) for v in variables]
    with pytest.raises((TypeError, ValueError), match="in place"):
        RemoteOptimizer(client).build(dict(zip(weights, variables, strict=True)))
    with pytest.raises((TypeError, ValueError), match="in place"):
        RemoteOptimizer(client).apply(grads, variables)  # builds, then applies
    built = RemoteOptimizer(client)
    built.build(variables[:1])
    with pytest.raises(ValueError, match="Unknown variable"):
        built.apply(grads, variables)
    assert client.status().version == 0  # nothing was pushed


class _ArrayLike:
    """Has a shape and a dtype (so it pairs), but no writable NumPy/CuPy storage."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value
        self.shape, self.dtype = value.shape, value.dtype

    def __array__(self, dtype=None, copy=None):
        return np.array(self._value, dtype=dtype)
