"""Keras training scenarios run in a subprocess whose KERAS_BACKEND is jax or torch.

Keras fixes its backend at import and the suite imports it on numpy, so the tests run these
with ``python -m tests.keras.scenarios NAME '{json args}'``; each prints ``RESULT {json}`` as
its last line, and the test asserts on it. Every scenario trains a tiny classifier for a few
steps against a real daemon and compares with local Keras doing the same.
"""

from __future__ import annotations

import contextlib
import json
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from paramserve.client import Client
from paramserve.client.keras import RemoteOptimizer

from .daemon import daemon

BACKEND = keras.backend.backend()
EPOCHS, BATCH = 3, 8
# XLA cannot compile the step's host call on TensorFlow (RemoteOptimizer says so); there,
# "eager" is Keras's default tf.function graph and "run_eagerly" is eager.
MODES = ["eager", "run_eagerly"] if BACKEND == "tensorflow" else ["eager", "jit"]
TOKEN_MARKER = "token-that-must-not-be-saved-7f3a"


def data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype("float32")
    return x, (x[:, :3].sum(axis=1) > 0).astype("int32")


def make_model() -> keras.Model:
    """The same weights every call (explicit names, so the paths match across processes)."""
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="net",
    )


def make_optimizer(case: str, model: keras.Model) -> keras.optimizers.Optimizer:
    """The Keras optimizer of each case (with exclusions naming ``model``'s variables)."""
    if case == "adam":
        return keras.optimizers.Adam(1e-3)
    if case == "adamw_exclusions":
        opt = keras.optimizers.AdamW(1e-2, weight_decay=0.5)
        opt.exclude_from_weight_decay(var_list=[model.get_layer("out").kernel], var_names=["bias"])
        return opt
    if case == "sgd_schedule":
        schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5)
        return keras.optimizers.SGD(schedule, momentum=0.9)
    if case == "lion_ema":
        return keras.optimizers.Lion(1e-3, use_ema=True, ema_momentum=0.9)
    if case == "sgd_momentum":
        return keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)
    if case == "loss_scale_optimizer":
        # Starts so high that some steps overflow (scale halves, step skipped) and others
        # grow it back (doubles every 2 finite steps): both paths, on both sides.
        return keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.01), initial_scale=2.0**110, dynamic_growth_steps=2
        )
    if case == "loss_scale_factor":
        return keras.optimizers.SGD(0.01, loss_scale_factor=128.0)
    raise ValueError(case)


def weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]


def compare(local: list[np.ndarray], remote: list[np.ndarray]) -> dict[str, Any]:
    """Bit-exact or not, and the largest relative difference ||a - b|| / ||a|| per variable."""
    rel = [
        float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        for a, b in zip(local, remote, strict=True)
    ]
    exact = all(np.array_equal(a, b) for a, b in zip(local, remote, strict=True))
    return {"exact": exact, "max_rel": max(rel)}


@contextlib.contextmanager
def numpy_pow() -> Iterator[None]:
    """Keras's JAX ``power`` computed by NumPy (C's powf) for concrete values.

    XLA's pow differs from powf by one ulp at some exponents (``0.9 ** 4``: 0.6560999 vs
    0.6561), and Adam-family optimizers and decay schedules raise to the step number; the
    server (optim_core, NumPy) uses powf as Keras's numpy backend does. With this in the
    local reference, eager JAX training is compared bit for bit.
    """
    if BACKEND != "jax":
        yield
        return
    import jax
    from keras.src.backend.jax import numpy as jax_numpy

    original = jax_numpy.power

    def power(x1: Any, x2: Any) -> Any:
        if isinstance(x1, jax.core.Tracer) or isinstance(x2, jax.core.Tracer):
            return original(x1, x2)
        return jax.numpy.asarray(np.power(np.asarray(x1), np.asarray(x2)))

    jax_numpy.power = power
    try:
        yield
    finally:
        jax_numpy.power = original


def fit(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    *,
    jit: bool | str,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    epochs: int = EPOCHS,
    batch_size: int = BATCH,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> None:
    if x is None or y is None:
        x, y = data()
    model.compile(
        loss="sparse_categorical_crossentropy",
        optimizer=optimizer,
        jit_compile=jit == "jit" if isinstance(jit, str) else jit,
        run_eagerly=jit == "run_eagerly",
    )
    model.fit(
        x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0, callbacks=callbacks
    )


# --- scenarios ----------------------------------------------------------------------------
def fit_matrix(cases: list[str], modes: list[str]) -> dict[str, Any]:
    """``fit`` for 3 epochs, one worker in sync mode vs local Keras, per case and mode."""
    results: dict[str, Any] = {}
    with daemon("--mode", "sync", "--replicas", "1") as server, Client(server.address) as admin:
        for mode in modes:
            jit = {"eager": False, "jit": True}.get(mode, mode)
            for case in cases:
                model = make_model()
                fit(model, make_optimizer(case, model), jit=jit)
                plain = weights(model)
                reference = plain
                if not jit and BACKEND == "jax":
                    model = make_model()
                    with numpy_pow():
                        fit(model, make_optimizer(case, model), jit=jit)
                    reference = weights(model)
                model = make_model()
                remote = RemoteOptimizer(server.address, make_optimizer(case, model))
                fit(model, remote, jit=jit)
                description = admin.describe()
                results[f"{mode}/{case}"] = {
                    "vs_reference": compare(reference, weights(model)),
                    "vs_plain_keras": compare(plain, weights(model)),
                    "iterations": int(keras.ops.convert_to_numpy(remote.iterations)),
                    "server_version": admin.status().version,
                    "get_config_is_servers": remote.get_config() == description.optimizer["config"],
                    "exclusions": description.optimizer.get("exclude_from_weight_decay"),
                }
                remote.close()
                admin.delete_model()
    return results


class ServerLearningRate(keras.callbacks.Callback):
    """Records the server's learning rate after the first step of each epoch (TensorFlow
    connects in that step: there is no model on the server before it)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.seen: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if batch == 0:
            self.seen.append(self.client.describe().hyperparameters["learning_rate"])


def features(tmp: str) -> dict[str, Any]:
    """A custom loop, learning-rate callbacks, iterations, get_config, save, loss scaling."""
    out: dict[str, Any] = {}
    with (
        daemon("--mode", "sync", "--replicas", "1", "--nonfinite", "allow") as server,
        Client(server.address) as admin,
    ):
        out["custom_loop"] = custom_loop(server.address, admin)
        admin.delete_model()
        for mode in MODES:
            jit = {"eager": False, "jit": True}.get(mode, mode)
            out[f"callbacks/{mode}"] = learning_rate_callbacks(server.address, admin, jit)
            admin.delete_model()
        out["save"] = save(server.address, admin, Path(tmp))
        admin.delete_model()
        out["mixed_float16"] = mixed_float16(server.address)
        admin.delete_model()
        for case in ("loss_scale_optimizer", "loss_scale_factor"):
            for mode in MODES:
                jit = {"eager": False, "jit": True}.get(mode, mode)
                out[f"{case}/{mode}"] = loss_scaling(server.address, admin, case, jit)
                admin.delete_model()
    return out


def custom_loop(address: str, admin: Client) -> dict[str, Any]:
    """``apply_gradients(zip(grads, model.trainable_variables))`` in an eager loop, with the
    learning rate changed halfway by assigning the variable itself."""
    x, y = data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def train(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> list[float]:
        rates = []
        for step in range(6):
            if step == 3:
                optimizer.learning_rate.assign(5e-3)
            batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
            grads = gradients(model, loss_fn, x[batch], y[batch])
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            rates.append(float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
        return rates

    model = make_model()
    with numpy_pow():
        train(model, keras.optimizers.Adam(1e-2))
    local = weights(model)
    model = make_model()
    remote = RemoteOptimizer(address, keras.optimizers.Adam(1e-2))
    remote.build(model.trainable_variables)
    train(model, remote)
    result = compare(local, weights(model))
    result["server_learning_rate"] = admin.describe().hyperparameters["learning_rate"]
    result["iterations"] = int(keras.ops.convert_to_numpy(remote.iterations))
    result["server_version"] = admin.status().version
    remote.close()
    return result


def gradients(model: keras.Model, loss_fn: Callable[..., Any], x: Any, y: Any) -> list[Any]:
    """d loss / d trainable variables, on the current backend (eager)."""
    if BACKEND == "jax":
        import jax

        def loss(trainable: list[Any]) -> Any:
            y_pred, _ = model.stateless_call(
                trainable, [v.value for v in model.non_trainable_variables], x
            )
            return loss_fn(y, y_pred)

        return list(jax.grad(loss)([v.value for v in model.trainable_variables]))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        return tape.gradient(loss, model.trainable_variables)
    import torch

    model.zero_grad()
    loss = loss_fn(torch.as_tensor(y), model(torch.as_tensor(x)))
    loss.backward()
    return [v.value.grad for v in model.trainable_variables]


def learning_rate_callbacks(address: str, admin: Client, jit: bool | str) -> dict[str, Any]:
    """LearningRateScheduler and ReduceLROnPlateau act on the server; weights as local."""

    def callbacks(client: Client | None) -> list[keras.callbacks.Callback]:
        schedule = keras.callbacks.LearningRateScheduler(lambda epoch: 0.01 / (epoch + 1))
        # min_delta larger than any improvement: every epoch end halves the rate.
        plateau = keras.callbacks.ReduceLROnPlateau(
            monitor="loss", factor=0.5, patience=0, min_delta=100.0
        )
        return [schedule, plateau] + ([ServerLearningRate(client)] if client else [])

    model = make_model()
    fit(model, make_optimizer("sgd_momentum", model), jit=jit, epochs=4, callbacks=callbacks(None))
    local = weights(model)
    model = make_model()
    remote = RemoteOptimizer(address, make_optimizer("sgd_momentum", model))
    recorder = callbacks(admin)
    fit(model, remote, jit=jit, epochs=4, callbacks=recorder)
    result = compare(local, weights(model))
    result["server_rates_in_first_steps"] = recorder[-1].seen
    result["server_rate_after_fit"] = admin.describe().hyperparameters["learning_rate"]
    result["local_rate_after_fit"] = float(keras.ops.convert_to_numpy(remote.learning_rate))
    result["iterations"] = int(keras.ops.convert_to_numpy(remote.iterations))
    result["server_version"] = admin.status().version
    result["get_config_is_servers"] = remote.get_config() == admin.describe().optimizer["config"]
    result["get_config_learning_rate"] = remote.get_config()["learning_rate"]
    remote.close()
    return result


def save(address: str, admin: Client, tmp: Path) -> dict[str, Any]:
    """``model.save()`` of a model compiled with a RemoteOptimizer holds no connection state."""
    model = make_model()
    remote = RemoteOptimizer(
        address,
        make_optimizer("adam", model),
        worker_id="worker-marker-41",
        token=TOKEN_MARKER,
    )
    fit(model, remote, jit=False, epochs=1)
    path = tmp / "model.keras"
    model.save(path)
    raw = b"".join(zipfile.ZipFile(path).read(name) for name in zipfile.ZipFile(path).namelist())
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    markers = {
        "address": address.encode() in raw,
        "port": address.rsplit(":", 1)[1].encode() in raw,
        "worker_id": b"worker-marker-41" in raw,
        "token": TOKEN_MARKER.encode() in raw,
    }
    loaded = keras.models.load_model(path, compile=False)
    try:
        keras.models.load_model(path)
        load_error = ""
    except ValueError as exc:
        load_error = str(exc)
    remote.close()
    return {
        "markers_found": markers,
        "saved_optimizer": config["compile_config"]["optimizer"],
        "weights_reload": compare(weights(model), weights(loaded))["exact"],
        "load_with_compile_error": load_error,
    }


def loss_scaling(address: str, admin: Client, case: str, jit: bool | str) -> dict[str, Any]:
    """Keras scales the loss with the outer optimizer's factor; the server unscales once."""
    model = make_model()
    local_optimizer = make_optimizer(case, model)
    fit(model, local_optimizer, jit=jit)
    local = weights(model)
    model = make_model()
    remote = RemoteOptimizer(address, make_optimizer(case, model))
    fit(model, remote, jit=jit)
    result = compare(local, weights(model))
    state = admin.optimizer_state()
    scale = keras.ops.convert_to_numpy
    if case == "loss_scale_optimizer":
        result["local_scale"] = float(scale(local_optimizer.dynamic_scale))
        result["server_scale"] = float(state["dynamic_scale"])
    else:
        result["local_scale"] = float(local_optimizer.loss_scale_factor)
        result["server_scale"] = admin.describe().optimizer["config"]["loss_scale_factor"]
    result["client_scale"] = float(scale(remote.scale_loss(keras.ops.ones(()))))
    result["local_iterations"] = int(scale(local_optimizer.iterations))
    result["iterations"] = int(scale(remote.iterations))
    remote.close()
    return result


def mixed_float16(address: str) -> dict[str, Any]:
    """Under a mixed_float16 policy ``compile`` wraps the optimizer in Keras's own
    LossScaleOptimizer: the scale lives on the client, which pushes unscaled gradients."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()
        fit(model, keras.optimizers.SGD(0.01), jit=MODES[-1])
        local = weights(model)
        local_optimizer = model.optimizer
        model = make_model()
        remote = RemoteOptimizer(address, keras.optimizers.SGD(0.01))
        fit(model, remote, jit=MODES[-1])
        result = compare(local, weights(model))
        scale = keras.ops.convert_to_numpy
        result["wrapper"] = type(model.optimizer).__name__
        result["local"] = [
            int(scale(local_optimizer.iterations)),
            float(scale(local_optimizer.dynamic_scale)),
        ]
        result["remote"] = [
            int(scale(remote.iterations)),
            float(scale(model.optimizer.dynamic_scale)),
        ]
        remote.close()
        return result
    finally:
        keras.mixed_precision.set_global_policy("float32")


def worker(address: str, rank: int, reference: bool) -> dict[str, Any]:
    """One of two data-parallel workers (sync, mean): each fits its half of every batch.

    With ``reference``, this worker then fits one local model on the combined batches
    (both halves of each step, in order) and compares.
    """
    x, y = data(64)
    halves = [(x[i::2], y[i::2]) for i in range(2)]
    model = make_model()
    remote = RemoteOptimizer(address, make_optimizer("adam", model), worker_id=f"worker-{rank}")
    fit(model, remote, jit=True, x=halves[rank][0], y=halves[rank][1])
    result: dict[str, Any] = {"iterations": int(keras.ops.convert_to_numpy(remote.iterations))}
    if reference:
        # Step i of the combined run sees batch i of both workers: 16 samples.
        xc = np.concatenate([h[0][s : s + BATCH] for s in range(0, 32, BATCH) for h in halves])
        yc = np.concatenate([h[1][s : s + BATCH] for s in range(0, 32, BATCH) for h in halves])
        local = make_model()
        fit(local, make_optimizer("adam", local), jit=True, x=xc, y=yc, batch_size=2 * BATCH)
        result.update(compare(weights(local), weights(model)))
    remote.close()
    return result


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "fit_matrix": fit_matrix,
    "features": features,
    "worker": worker,
}

if __name__ == "__main__":
    name, arguments = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print("RESULT " + json.dumps(SCENARIOS[name](**arguments)), flush=True)
