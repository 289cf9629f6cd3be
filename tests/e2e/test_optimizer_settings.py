"""Every setting of an optim_core optimizer reaches the server and acts there as it does locally.

An optimizer instance given to ``Client.create_model`` is serialized by the SDK and rebuilt by
the server. For every optimizer x every base option (the conformance suite's table) and for
weight-decay exclusions (which Keras's config drops), the server's weights, optimizer state
and config after a few pushes are compared bit for bit with the same optimizer run locally.
"""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import Client
from tests.support.optimizer_cases import (
    BASE_OPTIONS,
    CLASS_NAMES,
    LSO_DEFAULT_INNER,
    build_our_config,
)

SHAPES = {
    "dense/kernel": (5, 3),
    "dense/bias": (3,),
    "scale": (),
    "conv/kernel": (2, 3, 4),
    "token_embedding/embeddings": (4, 3),
}
STEPS = 6


def initial_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: (rng.standard_normal(s) * 0.5).astype(np.float32) for n, s in SHAPES.items()}


def gradient_stream() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        for _ in range(STEPS)
    ]


def make(class_name: str, base: dict) -> optim_core.Optimizer:
    """``class_name`` with the base options ``base`` (on the inner optimizer of the wrapper)."""
    if class_name == "LossScaleOptimizer":
        inner = ("Adam", dict(base)) if base else LSO_DEFAULT_INNER
        config = {"inner_optimizer": inner}
    else:
        config = dict(base)
    return getattr(optim_core, class_name)(**build_our_config(config))


def run_local(optimizer: optim_core.Optimizer) -> tuple[dict, dict]:
    variables = {n: optim_core.Variable(v.copy(), path=n) for n, v in initial_values().items()}
    for grads in gradient_stream():
        optimizer.apply([grads[n] for n in SHAPES], [variables[n] for n in SHAPES])
    return {n: v.value for n, v in variables.items()}, optimizer.state_dict()


def run_remote(client: Client, optimizer: optim_core.Optimizer, variables=None) -> tuple:
    client.create_model(variables or initial_values(), optimizer)
    try:
        for grads in gradient_stream():
            client.push(grads)
        return dict(client.pull()), dict(client.optimizer_state()), client.describe().optimizer
    finally:
        client.delete_model()


def assert_bits(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        got = np.asarray(actual[name])
        assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), name


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from paramserve.server.app import create_server
    from paramserve.server.config import ServerConfig

    server = create_server(ServerConfig(port=0, log_level="warning").replace(mode="async"))
    with Client(server.address, timeout_s=30.0) as c:
        yield c
    server.stop(grace_s=0)


@pytest.mark.parametrize("class_name", CLASS_NAMES)
@pytest.mark.parametrize(
    "base", BASE_OPTIONS, ids=[",".join(b) or "defaults" for b in BASE_OPTIONS]
)
def test_every_base_option_of_every_optimizer_acts_on_the_server_as_locally(
    client, class_name, base
):
    weights, state, config = run_remote(client, make(class_name, base))
    local = make(class_name, base)
    local_weights, local_state = run_local(local)
    assert_bits(weights, local_weights)
    assert_bits(state, local_state)
    assert config == optim_core.serialize(local)


@pytest.mark.parametrize("class_name", ["AdamW", "SGD", "Lamb", "LossScaleOptimizer"])
def test_weight_decay_exclusions_reach_the_server(client, class_name):
    values = initial_values()

    def excluded() -> optim_core.Optimizer:
        optimizer = make(class_name, {"weight_decay": 0.2})
        target = getattr(optimizer, "inner_optimizer", optimizer)
        # By name (a regex on the variable's last path component), and by the array itself.
        target.exclude_from_weight_decay(var_names=["bias"], var_list=[values["conv/kernel"]])
        return target if class_name != "LossScaleOptimizer" else optimizer

    weights, state, config = run_remote(client, excluded(), values)
    local = make(class_name, {"weight_decay": 0.2})
    getattr(local, "inner_optimizer", local).exclude_from_weight_decay(
        var_names=["bias"], var_paths=["conv/kernel"]
    )
    local_weights, local_state = run_local(local)
    assert_bits(weights, local_weights)
    assert_bits(state, local_state)
    assert config == optim_core.serialize(local)
    # The exclusions matter: with decay on every variable, the excluded ones end elsewhere.
    decayed, _ = run_local(make(class_name, {"weight_decay": 0.2}))
    for name in ("dense/bias", "conv/kernel"):
        assert decayed[name].tobytes() != weights[name].tobytes(), name
    assert decayed["dense/kernel"].tobytes() == weights["dense/kernel"].tobytes()


def test_a_callable_learning_rate_is_refused_before_anything_is_sent(client):
    optimizer = optim_core.Adam(learning_rate=lambda: 0.01)
    with pytest.raises(TypeError, match="cannot be sent to the server"):
        client.create_model(initial_values(), optimizer)
    assert not client.status().has_model


def test_an_exclusion_by_an_unnamed_array_is_refused_before_anything_is_sent(client):
    optimizer = optim_core.AdamW(weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_list=[np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="cannot be written into a config"):
        client.create_model(initial_values(), optimizer)
    assert not client.status().has_model


@pytest.mark.parametrize(
    "config",
    [
        {"class_name": "SGD", "config": {"learning_rate": 1, "momentum": 0}},
        {"class_name": "Adam", "config": {"learning_rate": 1, "beta_1": 0, "clipnorm": 2}},
        {
            "class_name": "LossScaleOptimizer",
            "config": {
                "inner_optimizer": {"class_name": "RMSprop", "config": {"rho": 1}},
                "initial_scale": 1024,
            },
        },
    ],
    ids=["sgd", "adam", "loss-scale"],
)
def test_whole_numbers_in_a_json_config_are_read_as_floats(client, config):
    """JavaScript and Go serialize 1.0 as 1: a float option written so is accepted."""
    client.create_model(initial_values(), config)
    try:
        served = client.describe().optimizer
        expected = optim_core.serialize(optim_core.get(_floats(config)))
        assert served == expected
        assert all(type(v) is float for v in client.describe().hyperparameters.values())
    finally:
        client.delete_model()


def _floats(config):
    """``config`` with every int turned into a float (what the server must read it as)."""
    if isinstance(config, dict):
        return {k: _floats(v) for k, v in config.items()}
    return float(config) if type(config) is int else config
