"""paramserve.client.keras.RemoteOptimizer in this process (Keras's numpy backend, gradients
given by hand) against real daemons: creation and joining, bad input refused before anything
is pushed, every setting reaching the server, the learning rate, config, tokens."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import Client, NotFoundError, PermissionDeniedError
from paramserve.client.keras import RemoteOptimizer, keras_optimizer_config

from .daemon import Daemon, clean_env, daemon

ADMIN_TOKEN = "admin-3c9e51a0b7d24f68"
WORKER_TOKEN = "worker-8d27f4e1c6a05b93"


@pytest.fixture(scope="module")
def server() -> Iterator[Daemon]:
    with daemon("--mode", "sync", "--replicas", "1") as running:
        yield running


@pytest.fixture
def admin(server: Daemon) -> Iterator[Client]:
    """A client for checks; the model is deleted after each test."""
    with Client(server.address, timeout_s=30) as client:
        yield client
        with contextlib.suppress(NotFoundError):
            client.delete_model()


@pytest.fixture(scope="module")
def token_server() -> Iterator[Daemon]:
    env = clean_env(PARAMSERVE_ADMIN_TOKEN=ADMIN_TOKEN, PARAMSERVE_WORKER_TOKEN=WORKER_TOKEN)
    with daemon("--mode", "sync", "--replicas", "1", env=env) as running:
        yield running


def make_model(seed: int = 1, *, extra: bool = False, dtype: str = "float32") -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((4,)),
        keras.layers.Dense(3, name="hidden", dtype=dtype),
        keras.layers.Dense(2, name="out", dtype=dtype),
    ]
    if extra:
        layers.append(keras.layers.Dense(2, name="extra", dtype=dtype))
    return keras.Sequential(layers, name="net")


def values(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy()) for v in model.trainable_variables}


def ones_like(model: keras.Model) -> list[np.ndarray]:
    return [np.ones(v.shape, v.dtype) for v in model.trainable_variables]


def server_unchanged(admin: Client, version: int, weights: dict[str, np.ndarray]) -> None:
    assert admin.status().version == version
    pulled = admin.pull()
    assert {n: np.asarray(a) for n, a in pulled.items()}.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(pulled[name], value)


# --- compile, creation, joining -------------------------------------------------------------
def test_model_compile_takes_it_and_the_first_worker_creates_the_model(
    server: Daemon, admin: Client
) -> None:
    model = make_model()
    opt = RemoteOptimizer(server.address, keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss="mse")
    assert model.optimizer is opt
    assert isinstance(opt, keras.optimizers.Optimizer)
    initial = values(model)
    opt.build(model.trainable_variables)
    description = admin.describe()
    assert description.variable_names == list(initial)  # the Keras paths
    assert description.optimizer["class_name"] == "Adam"
    server_unchanged(admin, 0, initial)

    opt.apply_gradients(zip(ones_like(model), model.trainable_variables, strict=True))
    assert int(opt.iterations) == admin.status().version == 1
    for path, value in admin.pull().items():
        np.testing.assert_array_equal(values(model)[path], value)


def test_a_joining_worker_takes_the_servers_weights_before_its_first_step(
    server: Daemon, admin: Client
) -> None:
    first = make_model(seed=1)
    RemoteOptimizer(server.address, "adam").build(first.trainable_variables)
    second = make_model(seed=2)
    assert not np.array_equal(values(first)["net/out/kernel"], values(second)["net/out/kernel"])
    opt = RemoteOptimizer(server.address, "adam", worker_id="second")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # joining is silent
        opt.build(second.trainable_variables)
    for path, value in values(first).items():
        np.testing.assert_array_equal(values(second)[path], value)


def test_without_an_optimizer_it_joins_the_servers(server: Daemon, admin: Client) -> None:
    model = make_model()
    RemoteOptimizer(server.address, keras.optimizers.SGD(0.25)).build(model.trainable_variables)
    joined = RemoteOptimizer(server.address)
    joined.build(make_model(seed=3).trainable_variables)
    assert joined.get_config()["learning_rate"] == 0.25
    assert float(joined.learning_rate.numpy()) == 0.25


def test_another_definition_on_the_server_is_refused(server: Daemon, admin: Client) -> None:
    RemoteOptimizer(server.address, "adam").build(make_model().trainable_variables)
    with pytest.raises(ValueError, match="already has a model that differs"):
        RemoteOptimizer(server.address, "sgd").build(make_model().trainable_variables)


def test_first_apply_builds_and_warns_when_the_gradients_came_from_other_weights(
    server: Daemon, admin: Client
) -> None:
    RemoteOptimizer(server.address, "sgd").build(make_model(seed=1).trainable_variables)
    model = make_model(seed=2)
    opt = RemoteOptimizer(server.address, "sgd", worker_id="late")
    with pytest.warns(UserWarning, match="Call optimizer.build"):
        opt.apply(ones_like(model), model.trainable_variables)
    assert admin.status().version == 1


# --- bad input: a clear error, and nothing pushed ---------------------------------------------
def test_variables_of_another_model_are_refused(server: Daemon, admin: Client) -> None:
    model = make_model()
    opt = RemoteOptimizer(server.address, "adam")
    opt.build(model.trainable_variables)
    other = make_model()  # same layer names, so the same paths: told apart by identity
    before = values(model)
    with pytest.raises(ValueError, match="not the ones this RemoteOptimizer was built with"):
        opt.apply_gradients(zip(ones_like(other), other.trainable_variables, strict=True))
    server_unchanged(admin, 0, before)


def test_a_variable_of_another_dtype_is_refused(server: Daemon, admin: Client) -> None:
    model = make_model()
    RemoteOptimizer(server.address, "adam").build(model.trainable_variables)
    before = values(model)
    wide = make_model(dtype="float64")
    opt = RemoteOptimizer(server.address, "adam", worker_id="wide")
    with pytest.raises(
        ValueError, match=r"'net/hidden/kernel' is float64 \[4, 3\] here, but float32"
    ):
        opt.apply(ones_like(wide), wide.trainable_variables)
    assert not opt.built
    server_unchanged(admin, 0, before)


def test_a_variable_the_server_does_not_know_is_refused(server: Daemon, admin: Client) -> None:
    model = make_model()
    RemoteOptimizer(server.address, "adam").build(model.trainable_variables)
    before = values(model)
    bigger = make_model(extra=True)
    opt = RemoteOptimizer(server.address, "adam", worker_id="bigger")
    with pytest.raises(ValueError, match="has no variable 'net/extra/kernel'"):
        opt.apply(ones_like(bigger), bigger.trainable_variables)
    server_unchanged(admin, 0, before)


def test_a_variable_that_is_not_trainable_is_refused(server: Daemon, admin: Client) -> None:
    model = make_model()
    opt = RemoteOptimizer(server.address, "adam")
    opt.build(model.trainable_variables)
    before = values(model)
    frozen = keras.Variable(np.zeros(3, "float32"), trainable=False, name="frozen")
    with pytest.raises(ValueError, match="is not trainable"):
        opt.apply([np.ones(3, "float32")], [frozen])
    with pytest.raises(TypeError, match=r"updates keras\.Variables"):
        opt.apply([np.ones(3, "float32")], [np.zeros(3, "float32")])
    with pytest.raises(ValueError, match="not trainable"):
        RemoteOptimizer(server.address, "adam").build([frozen])
    wrong = ones_like(model)
    wrong[0] = np.ones((3, 4), "float32")
    with pytest.raises(ValueError, match=r"gradient for 'net/hidden/kernel' has shape \[3, 4\]"):
        opt.apply(wrong, model.trainable_variables)
    server_unchanged(admin, 0, before)


# --- settings -----------------------------------------------------------------------------
def test_every_setting_of_a_keras_optimizer_reaches_the_server(
    server: Daemon, admin: Client
) -> None:
    model = make_model()
    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=100, warmup_steps=5)
    inner = keras.optimizers.AdamW(
        schedule,
        weight_decay=0.01,
        global_clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.95,
        ema_overwrite_frequency=10,
        gradient_accumulation_steps=2,
        beta_1=0.8,
        amsgrad=True,
    )
    inner.exclude_from_weight_decay(var_list=[model.get_layer("out").kernel], var_names=["bias"])
    keras_opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=256.0)
    RemoteOptimizer(server.address, keras_opt).build(model.trainable_variables)

    server_opt = admin.describe().optimizer
    assert server_opt["class_name"] == "LossScaleOptimizer"
    assert server_opt["config"]["initial_scale"] == 256.0
    server_inner = server_opt["config"]["inner_optimizer"]
    assert server_inner["class_name"] == "AdamW"
    assert server_inner["exclude_from_weight_decay"] == {
        "var_names": ["bias"],
        "var_paths": ["net/out/kernel"],
    }
    expected = keras.optimizers.serialize(inner)["config"]
    for key, value in expected.items():
        if key == "learning_rate":
            assert server_inner["config"][key]["class_name"] == "CosineDecay"
            assert server_inner["config"][key]["config"] == value["config"]
        else:
            assert server_inner["config"][key] == value, key


@pytest.mark.parametrize(
    ("form", "class_name"),
    [
        (lambda: keras.optimizers.Nadam(2e-3), "Nadam"),
        (lambda: keras.optimizers.serialize(keras.optimizers.RMSprop(0.01)), "RMSprop"),
        (lambda: "adagrad", "Adagrad"),
        (lambda: optim_core.Lamb(0.01), "Lamb"),
    ],
    ids=["keras instance", "keras dict", "name", "optim_core instance"],
)
def test_optimizer_forms(server: Daemon, admin: Client, form: Any, class_name: str) -> None:
    RemoteOptimizer(server.address, form()).build(make_model().trainable_variables)
    assert admin.describe().optimizer["class_name"] == class_name


@pytest.mark.filterwarnings("ignore:The object being serialized includes a `lambda`")
def test_what_the_server_cannot_rebuild_is_refused_at_construction(server: Daemon) -> None:
    with pytest.raises(TypeError, match="Python callable"):
        RemoteOptimizer(server.address, keras.optimizers.Adam(lambda: 0.01))
    with pytest.raises(ValueError, match="Could not interpret optimizer identifier"):
        RemoteOptimizer(server.address, "no_such_optimizer")
    with pytest.raises(ValueError, match="could not rebuild"):
        RemoteOptimizer(server.address, {"class_name": "NoSuch", "config": {}})
    with pytest.raises(TypeError, match="cannot be the server's optimizer"):
        RemoteOptimizer(server.address, RemoteOptimizer(server.address))
    config = keras_optimizer_config(keras.optimizers.Adam(0.5))
    assert config["class_name"] == "Adam"
    assert config["config"]["learning_rate"] == 0.5


def test_target_forms(server: Daemon) -> None:
    with Client(server.address, worker_id="w") as client:
        assert RemoteOptimizer(client).client is client
        with pytest.raises(ValueError, match="differs from the Client's"):
            RemoteOptimizer(client, worker_id="other")
        with pytest.raises(TypeError, match="apply only when target is an address"):
            RemoteOptimizer(client, timeout_s=5)
    with pytest.raises(TypeError, match="address or a Client"):
        RemoteOptimizer(50051)  # type: ignore[arg-type]


# --- learning rate, iterations, config ----------------------------------------------------
def test_learning_rate_set_before_and_after_build_reaches_the_server(
    server: Daemon, admin: Client
) -> None:
    model = make_model()
    opt = RemoteOptimizer(server.address, keras.optimizers.SGD(0.1))
    opt.learning_rate = 0.2  # before the model exists: sent when it is built
    opt.build(model.trainable_variables)
    assert admin.describe().hyperparameters["learning_rate"] == pytest.approx(0.2, rel=1e-7)
    opt.learning_rate = 0.05
    assert admin.describe().hyperparameters["learning_rate"] == pytest.approx(0.05, rel=1e-7)
    opt.learning_rate.assign(0.01)  # the variable itself: sent with the next step
    opt.apply(ones_like(model), model.trainable_variables)
    assert admin.describe().hyperparameters["learning_rate"] == pytest.approx(0.01, rel=1e-7)
    assert opt.get_config()["learning_rate"] == pytest.approx(0.01, rel=1e-7)


def test_a_schedule_stays_a_schedule(server: Daemon, admin: Client) -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model = make_model()
    opt = RemoteOptimizer(server.address, keras.optimizers.SGD(schedule))
    opt.build(model.trainable_variables)
    for _ in range(2):
        opt.apply(ones_like(model), model.trainable_variables)
    assert int(opt.iterations) == 2
    assert float(opt.learning_rate) == pytest.approx(0.025)
    assert admin.describe().hyperparameters["learning_rate"] == pytest.approx(0.025)
    with pytest.raises(TypeError, match="follows a schedule"):
        opt.learning_rate = 0.5


def test_get_config_is_the_servers_and_no_connection_is_restored(
    server: Daemon, admin: Client
) -> None:
    opt = RemoteOptimizer(server.address, keras.optimizers.Adam(0.5, beta_1=0.7))
    assert opt.get_config()["beta_1"] == 0.7  # no model yet: the config it will create
    opt.build(make_model().trainable_variables)
    admin.set_hyperparameters(learning_rate=0.125)
    config = opt.get_config()
    assert config == admin.describe().optimizer["config"]
    assert config["learning_rate"] == 0.125
    assert server.address not in repr(keras.optimizers.serialize(opt))
    with pytest.raises(ValueError, match="compile=False"):
        RemoteOptimizer.from_config(config)


def test_pull_writes_the_servers_weights(server: Daemon, admin: Client) -> None:
    model = make_model()
    opt = RemoteOptimizer(server.address, "sgd")
    opt.build(model.trainable_variables)
    opt.apply(ones_like(model), model.trainable_variables)
    expected = values(model)
    for v in model.trainable_variables:
        v.assign(np.zeros(v.shape, "float32"))
    assert opt.pull() == 1
    for path, value in expected.items():
        np.testing.assert_array_equal(values(model)[path], value)


# --- tokens -------------------------------------------------------------------------------
def test_a_worker_token_joins_an_existing_model_and_cannot_create_one(
    token_server: Daemon,
) -> None:
    address = token_server.address
    model = make_model()
    worker = RemoteOptimizer(address, "adam", token=WORKER_TOKEN, worker_id="w")
    with pytest.raises(NotFoundError, match="Create the model first with an admin token"):
        worker.build(model.trainable_variables)
    assert not worker.built

    with Client(address, token=ADMIN_TOKEN) as admin:
        creator = RemoteOptimizer(admin, "adam")
        creator.build(make_model(seed=5).trainable_variables)
        try:
            worker.build(model.trainable_variables)  # joins and takes the server's weights
            np.testing.assert_array_equal(
                values(model)["net/out/kernel"], admin.pull()["net/out/kernel"]
            )
            worker.apply(ones_like(model), model.trainable_variables)
            assert admin.status().version == 1
            with pytest.raises(PermissionDeniedError, match="admin-only"):
                worker.learning_rate = 0.5
            other = RemoteOptimizer(address, "sgd", token=WORKER_TOKEN, worker_id="w2")
            with pytest.warns(UserWarning, match="the server's is used"):
                other.build(make_model().trainable_variables)
        finally:
            admin.delete_model()


def test_a_worker_with_frozen_layers_trains_the_rest(server: Daemon, admin: Client) -> None:
    RemoteOptimizer(server.address, "sgd").build(make_model().trainable_variables)
    model = make_model(seed=2)
    model.get_layer("hidden").trainable = False
    opt = RemoteOptimizer(server.address, "sgd", worker_id="frozen")
    opt.build(model.trainable_variables)
    hidden = admin.pull()["net/hidden/kernel"]
    opt.apply(ones_like(model), model.trainable_variables)
    after = admin.pull()
    np.testing.assert_array_equal(after["net/hidden/kernel"], hidden)
    np.testing.assert_array_equal(after["net/out/kernel"], values(model)["net/out/kernel"])
    assert after.version == 1
