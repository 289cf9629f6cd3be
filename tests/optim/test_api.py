"""The Keras-shaped API of optim_core: get(), configs both ways with real Keras, custom
optimizers, weights and named state, errors, sparse gradients and device selection."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.optim_core import SGD, Adam, AdamW, IndexedSlices, Optimizer, Variable, get
from tests.support.optimizer_cases import CLASS_NAMES, build_keras_config, build_our_config

keras = pytest.importorskip("keras")

# Non-default options per optimizer, so a config round trip carries real information.
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "SGD": {"momentum": 0.5, "nesterov": True},
    "Adam": {"beta_1": 0.8, "amsgrad": True},
    "AdamW": {"weight_decay": 0.1},
    "RMSprop": {"rho": 0.8, "centered": True},
    "Adadelta": {"rho": 0.9},
    "Adagrad": {"initial_accumulator_value": 0.2},
    "Adamax": {"beta_2": 0.99},
    "Nadam": {"epsilon": 1e-4},
    "Ftrl": {"l1_regularization_strength": 0.1, "beta": 0.5},
    "Lion": {"beta_1": 0.8},
    "Lamb": {"epsilon": 1e-5},
    "Adafactor": {"clip_threshold": 0.5},
    "Muon": {"exclude_layers": ["head"], "ns_steps": 3, "rms_rate": None},
    "ScheduleFreeAdamW": {"warmup_steps": 10},
    "LossScaleOptimizer": {"inner_optimizer": ("Adam", {"beta_1": 0.7}), "initial_scale": 8.0},
}
COMMON = {"learning_rate": 0.05, "clipnorm": 1.5, "use_ema": True, "name": "opt"}


def _configs(class_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = dict(NON_DEFAULT[class_name])
    if class_name == "LossScaleOptimizer":
        cfg["name"] = "opt"
    else:
        cfg.update(COMMON)
    return build_keras_config(cfg), build_our_config(cfg)


def _norm(config: dict[str, Any]) -> dict[str, Any]:
    """Configs compared as JSON (inner optimizer dicts included)."""
    return json.loads(json.dumps(config))


# --- get() ----------------------------------------------------------------------------
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_get_by_name_is_case_insensitive(class_name: str) -> None:
    if class_name == "LossScaleOptimizer":
        with pytest.raises(TypeError):
            get("lossscaleoptimizer")  # needs an inner optimizer, as in Keras
        return
    for name in (class_name, class_name.lower(), class_name.upper()):
        opt = get(name)
        assert type(opt) is getattr(optim_core, class_name)


def test_get_other_identifiers() -> None:
    opt = Adam()
    assert get(opt) is opt
    assert get(None) is None
    for bad in ("adam_w", "nope", 3):
        with pytest.raises(ValueError, match="Could not interpret optimizer identifier"):
            get(bad)


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_keras_config_loads_here(class_name: str) -> None:
    """A config exported from real Keras builds the same optimizer here."""
    kcfg, _ = _configs(class_name)
    k_opt = getattr(keras.optimizers, class_name)(**kcfg)
    exported = keras.optimizers.serialize(k_opt)
    ours = get(exported)
    assert type(ours).__name__ == class_name
    assert _norm(ours.get_config()) == _norm(k_opt.get_config())


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_our_config_loads_in_keras(class_name: str) -> None:
    """Our serialized config is accepted by real Keras and means the same thing."""
    _, ocfg = _configs(class_name)
    ours = getattr(optim_core, class_name)(**ocfg)
    blob = json.loads(json.dumps(optim_core.serialize(ours)))  # JSON-safe
    if class_name == "Lamb":  # Keras 3.15.1's deserialize table lacks Lamb (spec section 6)
        k_opt = keras.optimizers.Lamb.from_config(blob["config"])
    else:
        k_opt = keras.optimizers.deserialize(copy.deepcopy(blob))  # Keras pops from it
    assert type(k_opt).__name__ == class_name
    assert _norm(k_opt.get_config()) == _norm(ours.get_config())
    again = get(blob)
    assert _norm(again.get_config()) == _norm(ours.get_config())


def test_schedule_config_round_trips_with_keras() -> None:
    k_sched = keras.optimizers.schedules.CosineDecay(0.1, 100, alpha=0.1)
    exported = keras.optimizers.serialize(keras.optimizers.SGD(learning_rate=k_sched))
    ours = get(exported)
    assert isinstance(ours._learning_rate, optim_core.schedules.CosineDecay)
    assert float(ours.learning_rate) == float(k_sched(0))
    back = keras.optimizers.deserialize(json.loads(json.dumps(optim_core.serialize(ours))))
    assert back.get_config() == ours.get_config()


def test_default_names_follow_keras_snake_case() -> None:
    assert AdamW().name == "adam_w"
    assert optim_core.RMSprop().name == "rm_sprop"
    assert optim_core.ScheduleFreeAdamW().name == "schedule_free_adam_w"
    assert SGD(name="Custom").name == "Custom"


def test_learning_rate_is_float32_rounded_like_keras() -> None:
    assert Adam(learning_rate=0.001).get_config()["learning_rate"] == 0.0010000000474974513


# --- constructor validation -----------------------------------------------------------
@pytest.mark.parametrize(
    ("class_name", "kwargs"),
    [
        ("Adam", {"learning_rate": 1}),
        ("Adam", {"learning_rate": np.float32(0.1)}),
        ("Adam", {"lr": 0.1}),
        ("Adam", {"clipnorm": 0.0, "clipvalue": 1.0}),
        ("Adam", {"gradient_accumulation_steps": 1}),
        ("Adam", {"use_ema": True, "ema_momentum": 1.5}),
        ("Adam", {"use_ema": True, "ema_overwrite_frequency": 2.0}),
        ("SGD", {"momentum": 0}),
        ("SGD", {"momentum": 1.5}),
        ("AdamW", {"weight_decay": None}),
        ("Lion", {"beta_1": 0.0}),
        ("Ftrl", {"learning_rate_power": 0.5}),
        ("Ftrl", {"initial_accumulator_value": -1.0}),
        ("Ftrl", {"l1_regularization_strength": -1.0}),
    ],
)
def test_invalid_arguments_raise_like_keras(class_name: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as keras_err:
        getattr(keras.optimizers, class_name)(**kwargs)
    with pytest.raises(ValueError) as our_err:
        getattr(optim_core, class_name)(**kwargs)
    first_words = str(keras_err.value).split(".")[0][:30]
    assert first_words in str(our_err.value)


def test_ema_overwrite_frequency_zero_is_refused() -> None:
    """Keras accepts 0 with backend-dependent meaning (spec 2.15); we refuse it."""
    with pytest.raises(ValueError, match="ema_overwrite_frequency"):
        Adam(use_ema=True, ema_overwrite_frequency=0)


def test_decay_argument_warns_and_is_ignored() -> None:
    with pytest.warns(UserWarning, match="no longer supported"):
        Adam(decay=0.1)


# --- applying -------------------------------------------------------------------------
def test_plain_arrays_are_updated_in_place() -> None:
    w = np.ones((3, 2), np.float32)
    b = np.zeros(2, np.float32)
    opt = SGD(learning_rate=0.5)
    opt.apply([np.ones_like(w), np.ones_like(b)], [w, b])
    np.testing.assert_array_equal(w, np.full((3, 2), 0.5, np.float32))
    np.testing.assert_array_equal(b, np.full(2, -0.5, np.float32))
    assert [v.name for v in opt.variables] == ["iteration", "learning_rate"]
    it = opt.apply_gradients(zip([np.ones_like(w)], [w], strict=True))
    assert int(it.value) == 2 and opt.iterations == 2


def test_build_from_dict_names_variables_by_path() -> None:
    params = {"dense/kernel": np.ones((2, 2), np.float32), "dense/bias": np.zeros(2, np.float32)}
    opt = Adam()
    opt.build(params)
    assert [v.name for v in opt.variables][2:] == [
        "dense_kernel_momentum",
        "dense_kernel_velocity",
        "dense_bias_momentum",
        "dense_bias_velocity",
    ]
    assert [v.name for v in opt.trainable_variables] == ["kernel", "bias"]
    opt.apply([np.ones((2, 2), np.float32), np.ones(2, np.float32)])
    assert params["dense/kernel"][0, 0] < 1.0


def test_apply_errors() -> None:
    w = Variable(np.ones(3, np.float32), "w")
    opt = Adam()
    opt.apply([], [])  # no-op, not built, no increment
    assert opt.iterations == 0 and not opt.built
    with pytest.raises(ValueError, match="must already be built"):
        opt.apply([np.ones(3, np.float32)])
    opt.build([w])
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.apply([None], [w])
    with pytest.raises(ValueError, match="Unknown variable"):
        opt.apply([np.ones(3, np.float32)], [Variable(np.ones(3, np.float32), "other")])
    with pytest.raises(ValueError, match=r"has shape \(4,\), expected \(3,\)"):
        opt.apply([np.ones(4, np.float32)], [w])
    with pytest.raises(ValueError, match="match the built variables"):
        opt.apply([np.ones(3, np.float32), np.ones(3, np.float32)])
    assert opt.iterations == 0
    np.testing.assert_array_equal(w.value, np.ones(3, np.float32))


def test_integer_variables_are_refused() -> None:
    with pytest.raises(TypeError, match="floating dtype"):
        Adam().build([np.zeros(3, np.int32)])


def test_none_gradient_skips_the_variable_but_counts_the_step() -> None:
    a, b = Variable(np.ones(2, np.float32), "a"), Variable(np.ones(2, np.float32), "b")
    opt = SGD(learning_rate=0.5)
    with pytest.warns(UserWarning, match=r"Gradients do not exist for variables \['a'\]"):
        opt.apply([None, np.ones(2, np.float32)], [a, b])
    np.testing.assert_array_equal(a.value, np.ones(2, np.float32))
    np.testing.assert_array_equal(b.value, np.full(2, 0.5, np.float32))
    assert opt.iterations == 1


def test_subset_of_variables_in_any_order() -> None:
    a, b = Variable(np.ones(2, np.float32), "a"), Variable(np.ones(2, np.float32), "b")
    opt = Adam()
    opt.build([a, b])
    opt.apply([np.ones(2, np.float32)], [b])
    assert a.value[0] == 1.0 and b.value[0] < 1.0


# --- sparse gradients -----------------------------------------------------------------
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_sparse_rows_mean_the_dense_gradient(class_name: str) -> None:
    """(indices, values) == the dense gradient with repeated rows summed, for every optimizer."""
    rng = np.random.default_rng(1)
    init = rng.standard_normal((6, 4)).astype(np.float32)
    _, ocfg = _configs(class_name)
    sparse_w, dense_w = Variable(init.copy(), "emb"), Variable(init.copy(), "emb")
    opt_s = getattr(optim_core, class_name)(**_configs(class_name)[1])
    opt_d = getattr(optim_core, class_name)(**ocfg)
    for _ in range(5):
        idx = rng.integers(0, 6, size=5)
        vals = rng.standard_normal((5, 4)).astype(np.float32)
        dense = np.zeros((6, 4), np.float32)
        np.add.at(dense, idx, vals)
        opt_s.apply([IndexedSlices(idx, vals)], [sparse_w])
        opt_d.apply([dense], [dense_w])
    np.testing.assert_array_equal(sparse_w.value, dense_w.value)


def test_sparse_gradient_errors() -> None:
    w = Variable(np.zeros((4, 2), np.float32), "emb")
    opt = SGD()
    with pytest.raises(ValueError, match=r"must be in \[0, 4\)"):
        opt.apply([(np.array([4]), np.ones((1, 2), np.float32))], [w])
    with pytest.raises(ValueError, match=r"must be in \[0, 4\)"):
        opt.apply([(np.array([-1]), np.ones((1, 2), np.float32))], [w])
    with pytest.raises(ValueError, match=r"must have shape \(2, 2\)"):
        opt.apply([(np.array([0, 1]), np.ones((3, 2), np.float32))], [w])
    with pytest.raises(ValueError, match="1-D integer"):
        opt.apply([(np.array([0.5]), np.ones((1, 2), np.float32))], [w])
    with pytest.raises(ValueError, match="scalar"):
        SGD().apply([(np.array([0]), np.ones((1,), np.float32))], [Variable(np.float32(1), "s")])
    assert opt.iterations == 0
    np.testing.assert_array_equal(w.value, np.zeros((4, 2), np.float32))


# --- weights and named state ----------------------------------------------------------
def _train(opt: Optimizer, var: Variable, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.apply([rng.standard_normal(var.shape).astype(np.float32)], [var])


@pytest.mark.parametrize("class_name", CLASS_NAMES)
@pytest.mark.parametrize("mode", ["weights", "state_dict"])
def test_restore_then_continue_equals_uninterrupted(class_name: str, mode: str) -> None:
    """Saving the optimizer's state and loading it into a fresh one loses nothing."""
    init = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    _, cfg = _configs(class_name)
    full = Variable(init.copy(), "w")
    opt_full = get(optim_core.serialize(getattr(optim_core, class_name)(**cfg)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(opt_full, full, 6, seed=1)
        _train(opt_full, full, 6, seed=2)

        part = Variable(init.copy(), "w")
        opt_a = get(optim_core.serialize(getattr(optim_core, class_name)(**cfg)))
        _train(opt_a, part, 6, seed=1)
        saved = opt_a.get_weights() if mode == "weights" else opt_a.state_dict()
        resumed = Variable(part.numpy(), "w")
        opt_b = get(optim_core.serialize(getattr(optim_core, class_name)(**cfg)))
        opt_b.build([resumed])
        if mode == "weights":
            opt_b.set_weights(saved)
        else:
            opt_b.load_state_dict(saved)
        assert opt_b.iterations == opt_a.iterations
        _train(opt_b, resumed, 6, seed=2)
    np.testing.assert_array_equal(resumed.value, full.value)
    for x, y in zip(opt_b.get_weights(), opt_full.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_weights_start_with_iteration_and_are_checked() -> None:
    w = Variable(np.ones(3, np.float32), "w")
    opt = Adam()
    with pytest.raises(ValueError, match="not yet been built"):
        opt.set_weights([])
    opt.apply([np.ones(3, np.float32)], [w])
    weights = opt.get_weights()
    assert weights[0].dtype == np.int32 and int(weights[0]) == 1
    assert len(weights) == 4
    before = [x.copy() for x in opt.get_weights()]
    with pytest.raises(ValueError, match="expects 4 arrays"):
        opt.set_weights(weights[:3])
    bad = [x.copy() for x in weights]
    bad[3] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="shape"):
        opt.set_weights(bad)
    for x, y in zip(opt.get_weights(), before, strict=True):
        np.testing.assert_array_equal(x, y)  # nothing was half-applied


def test_state_dict_keys_and_validation() -> None:
    opt = Adam()
    w = Variable(np.ones(3, np.float32), path="dense/kernel")
    opt.build([w])
    state = opt.state_dict()
    assert list(state) == [
        "iteration",
        "learning_rate",
        "dense_kernel_momentum",
        "dense_kernel_velocity",
    ]
    with pytest.raises(ValueError, match="missing keys"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "iteration"})
    with pytest.raises(ValueError, match="unexpected keys"):
        opt.load_state_dict({**state, "x": np.zeros(1)})
    with pytest.raises(ValueError, match="dtype"):
        opt.load_state_dict({**state, "dense_kernel_momentum": np.zeros(3, np.int64)})


def test_learning_rate_setter() -> None:
    opt = Adam(learning_rate=0.1)
    opt.learning_rate = 0.5
    assert opt.learning_rate == np.float32(0.5)
    opt.learning_rate = optim_core.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert "learning_rate" not in [v.name for v in opt.variables]
    with pytest.raises(TypeError, match="not settable"):
        opt.learning_rate = 0.3
    calls = []
    opt2 = SGD(learning_rate=lambda: calls.append(1) or 0.25)
    w = Variable(np.ones(1, np.float32), "w")
    opt2.apply([np.ones(1, np.float32)], [w])
    assert w.value[0] == np.float32(0.75) and calls


def test_weight_decay_exclusion_by_name_matches_keras() -> None:
    init = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
    grads = [np.full((2, 2), 0.1, np.float32), np.full(2, 0.1, np.float32)]
    k_vars = [keras.Variable(v.copy(), name=k) for k, v in init.items()]
    k_opt = keras.optimizers.AdamW(weight_decay=0.5, learning_rate=0.1)
    k_opt.exclude_from_weight_decay(var_names=["bias"])
    k_opt.apply(grads, k_vars)
    ours = [Variable(v.copy(), k) for k, v in init.items()]
    opt = AdamW(weight_decay=0.5, learning_rate=0.1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.apply(grads, ours)
    for o, k in zip(ours, k_vars, strict=True):
        np.testing.assert_array_equal(o.value, k.numpy())
    with pytest.raises(ValueError, match="before the optimizer is built"):
        opt.exclude_from_weight_decay(var_names=["x"])


# --- custom optimizers ----------------------------------------------------------------
@optim_core.register_optimizer(name="mymomentum")
class MyMomentum(Optimizer):
    """The Keras 3 docs' momentum-SGD example, written against optim_core."""

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.momentum = momentum

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(self.trainable_variables, "momentum")

    def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
        lr = variable.dtype.type(learning_rate)
        m = self.momentums[self._get_variable_index(variable)]
        self.assign(m, m * variable.dtype.type(self.momentum) - gradient * lr)
        self.assign_add(variable, m)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "momentum": self.momentum}


def test_custom_optimizer_works_like_a_builtin() -> None:
    opt = get("MyMomentum")
    assert isinstance(opt, MyMomentum)
    again = get({"class_name": "MyMomentum", "config": opt.get_config()})
    assert again.get_config() == opt.get_config()
    rng = np.random.default_rng(3)
    init = rng.standard_normal((3, 3)).astype(np.float32)
    mine, ref = Variable(init.copy(), "w"), Variable(init.copy(), "w")
    builtin = SGD(learning_rate=0.01, momentum=0.9, weight_decay=0.01, clipnorm=1.0)
    custom = MyMomentum(weight_decay=0.01, clipnorm=1.0)
    for _ in range(10):
        g = rng.standard_normal((3, 3)).astype(np.float32)
        custom.apply([g], [mine])
        builtin.apply([g], [ref])
    np.testing.assert_array_equal(mine.value, ref.value)
    assert [v.name for v in custom.variables] == [v.name for v in builtin.variables]
    with pytest.raises(ValueError, match="already registered"):
        optim_core.register_optimizer(SGD, name="mymomentum")


# --- devices --------------------------------------------------------------------------
def test_device_resolution_without_gpu() -> None:
    if optim_core.gpu_available():
        pytest.skip("a GPU is present")
    assert optim_core.resolve_device("auto") == "cpu"
    assert optim_core.array_module("cpu") is np
    with pytest.raises(RuntimeError, match="no usable GPU"):
        optim_core.resolve_device("gpu")
    with pytest.raises(ValueError, match="device"):
        optim_core.resolve_device("tpu")


def test_importing_does_not_import_cupy_or_numba() -> None:
    code = (
        "import sys; import paramserve.optim_core as o; o.Adam();"
        "print('cupy' in sys.modules, 'numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.gpu
def test_gpu_variables_stay_on_the_gpu() -> None:
    if not optim_core.gpu_available():
        pytest.skip("no usable GPU (CuPy) on this machine")
    cp = optim_core.array_module("gpu")
    w = Variable(np.ones((4, 4), np.float32), "w", device="gpu")
    opt = Adam()
    opt.apply([cp.ones((4, 4), cp.float32)], [w])
    assert type(w.value).__module__.startswith("cupy")
    assert all(type(v.value).__module__.startswith("cupy") for v in opt.variables[2:])
    assert isinstance(opt.get_weights()[2], np.ndarray)
