"""ModelStore: creation, validation (state unchanged on every error), apply, read, waits, state."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from paramserve import optim_core
from paramserve.optim_core import IndexedSlices
from paramserve.server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from paramserve.server.store import Limits, ModelState, ModelStore, VariableSpec
from paramserve.wire import SparseRows
from tests.support.asserts import assert_same as assert_bitwise_equal
from tests.support.asserts import assert_state_equal
from tests.support.models.mixed import grads_for, model_vars
from tests.support.replay import LocalReplay
from tests.support.waiting import WAIT_S, count_waiters, wait_until


@pytest.fixture
def store() -> ModelStore:
    s = ModelStore()
    assert s.create_model("m", "adam", model_vars()).created
    return s


def snapshot(store: ModelStore) -> tuple:
    """Everything observable, to check that a failed call changed nothing."""
    return store.read(), store.optimizer_state(), store.hyperparameters()


def assert_unchanged(store: ModelStore, before: tuple) -> None:
    after = snapshot(store)
    assert after[0][0] == before[0][0]
    assert_bitwise_equal(after[0][1], before[0][1])
    assert_state_equal(after[1], before[1])
    assert after[2] == before[2]


# --- creation ---------------------------------------------------------------------------
def test_create_is_idempotent_and_reports_other_initial_values(store: ModelStore) -> None:
    assert store.has_model and store.model_name == "m" and store.version == 0
    outcome = store.create_model("m", "adam", model_vars(seed=5))
    assert not outcome.created and not outcome.values_match  # other initial values
    assert store.create_model("m", "adam", model_vars()).values_match
    assert store.specs() == [
        VariableSpec("dense/kernel", "float32", (4, 3)),
        VariableSpec("dense/bias", "float32", (3,)),
        VariableSpec("emb", "float32", (10, 2)),
        VariableSpec("scale", "float32", ()),
    ]
    assert_bitwise_equal(store.read()[1], model_vars())


def test_create_copies_the_callers_arrays() -> None:
    variables = model_vars()
    store = ModelStore()
    store.create_model("m", "sgd", variables)
    variables["dense/bias"][:] = 99
    assert_bitwise_equal(store.read()[1], model_vars())
    out = store.read(["dense/bias"])[1]["dense/bias"]
    out[:] = -1  # a read is a copy, too
    assert_bitwise_equal(store.read()[1], model_vars())


@pytest.mark.parametrize(
    ("name", "optimizer", "change", "needle"),
    [
        ("m", "adam", ("dense/bias", np.zeros(4, np.float32)), "'dense/bias' is float32 [3]"),
        ("m", "adam", ("dense/bias", np.zeros(3, np.float64)), "float64 [3] in the request"),
        ("m", "adam", ("extra", np.zeros(3, np.float32)), "unexpected ['extra']"),
        ("m", "sgd", None, "class_name is 'Adam' on the server, 'SGD' in the request"),
        ("m", {"class_name": "Adam", "config": {"learning_rate": 0.5}}, None, "learning_rate"),
        ("other", "adam", None, "named 'm'"),
    ],
)
def test_create_conflicting_definition(store, name, optimizer, change, needle) -> None:
    variables = model_vars()
    if change is not None:
        variables[change[0]] = change[1]
    before = snapshot(store)
    with pytest.raises(AlreadyExists, match=None) as err:
        store.create_model(name, optimizer, variables)
    assert needle in str(err.value)
    assert_unchanged(store, before)


def test_create_still_idempotent_after_hyperparameter_change(store: ModelStore) -> None:
    store.set_hyperparameters({"learning_rate": 0.1})
    assert store.create_model("m", "adam", model_vars()).created is False
    current = store.optimizer_config()
    assert store.create_model("m", current, model_vars()).created is False


@pytest.mark.parametrize(
    ("optimizer", "variables", "error", "needle"),
    [
        ("adam", {}, InvalidArgument, "at least one variable"),
        ("adam", {"w": np.zeros(3, np.int32)}, InvalidArgument, "dtype int32, expected a float"),
        ("adam", {"": np.zeros(3, np.float32)}, InvalidArgument, "must not be empty"),
        ("adam", {"a\nb": np.zeros(3, np.float32)}, InvalidArgument, "control characters"),
        ("adam", {"w": [1.0, 2.0]}, InvalidArgument, "must be a NumPy array"),
        (
            "adam",
            {"a/b": np.zeros(3, np.float32), "a_b": np.zeros(3, np.float32)},
            InvalidArgument,
            "share optimizer slot names",
        ),
        ("nosuch", {"w": np.zeros(3, np.float32)}, InvalidArgument, "nosuch"),
        (
            {"class_name": "Adam", "config": {"bogus": 1}},
            {"w": np.zeros(3, np.float32)},
            InvalidArgument,
            "not recognized",
        ),
        (
            {"class_name": "SGD", "config": {"momentum": 2.0}},
            {"w": np.zeros(3, np.float32)},
            InvalidArgument,
            "momentum",
        ),
        (42, {"w": np.zeros(3, np.float32)}, InvalidArgument, "name or a Keras"),
    ],
)
def test_create_rejects_bad_definitions(optimizer, variables, error, needle) -> None:
    store = ModelStore()
    with pytest.raises(error, match=None) as err:
        store.create_model("m", optimizer, variables)
    assert needle in str(err.value)
    assert not store.has_model and store.version == 0


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        (Limits(max_variables=3), "4 variables, over the limit of 3"),
        (Limits(max_tensor_bytes=50), "'emb' is 80 bytes, over the limit of 50"),
        (Limits(max_state_bytes=100), "variables take 144 bytes"),
        # The variables fit; with Adam's two slots per variable they do not.
        (Limits(max_state_bytes=300), "variables and optimizer state take"),
    ],
)
def test_create_over_limits(limits: Limits, needle: str) -> None:
    store = ModelStore(limits=limits)
    with pytest.raises(ResourceExhausted) as err:
        store.create_model("m", "adam", model_vars())
    assert needle in str(err.value)
    assert not store.has_model


def test_concurrent_creates_make_one_model() -> None:
    store = ModelStore()
    results: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(store.create_model("m", "adam", model_vars()).created)
        )
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert store.generation == 1


def test_delete_model() -> None:
    store = ModelStore()
    with pytest.raises(NotFound):
        store.delete_model()
    store.create_model("m", "sgd", model_vars())
    store.delete_model()
    assert not store.has_model and store.version == 0 and store.model_name == ""
    for call in (store.specs, store.read, store.export_state, store.hyperparameters):
        with pytest.raises(NotFound, match="no model"):
            call()
    assert store.create_model("m2", "adam", model_vars())


# --- validation: every row of the error table that applies to the core ------------------
BAD_PUSHES = [
    ({"dense/bias": np.zeros(3, np.float64)}, InvalidArgument,
     "gradient for 'dense/bias' has dtype float64, expected float32"),
    ({"dense/bias": np.zeros(4, np.float32)}, InvalidArgument,
     "gradient for 'dense/bias' has shape (4,), expected (3,)"),
    ({"scale": np.zeros(1, np.float32)}, InvalidArgument, "has shape (1,), expected ()"),
    ({"nope": np.zeros(3, np.float32)}, NotFound, "unknown variable(s) 'nope'"),
    ({}, InvalidArgument, "at least one gradient"),
    ({"dense/bias": [0.0, 0.0, 0.0]}, InvalidArgument, "must be a NumPy array or SparseRows"),
    ({"emb": SparseRows(np.array([0, 10]), np.zeros((2, 2), np.float32))}, InvalidArgument,
     "row indices in [0, 10], expected indices in [0, 10)"),
    ({"emb": SparseRows(np.array([-1]), np.zeros((1, 2), np.float32))}, InvalidArgument,
     "expected indices in [0, 10)"),
    ({"emb": SparseRows(np.array([1, 2]), np.zeros((2, 3), np.float32))}, InvalidArgument,
     "values of shape (2, 3), expected (2, 2)"),
    ({"emb": SparseRows(np.array([1.0]), np.zeros((1, 2), np.float32))}, InvalidArgument,
     "1-D integer indices"),
    ({"emb": SparseRows(np.array([1]), np.zeros((1, 2), np.float16))}, InvalidArgument,
     "has dtype float16, expected float32"),
    ({"scale": SparseRows(np.array([0]), np.zeros((1,), np.float32))}, InvalidArgument,
     "the variable is a scalar"),
    # One good tensor and one bad one: nothing of the push is accepted.
    ({"dense/kernel": np.ones((4, 3), np.float32), "dense/bias": np.zeros(2, np.float32)},
     InvalidArgument, "expected (3,)"),
]  # fmt: skip


@pytest.mark.parametrize(("grads", "error", "message"), BAD_PUSHES)
def test_validate_push_errors_say_expected_and_got(store, grads, error, message) -> None:
    before = snapshot(store)
    with pytest.raises(error) as err:
        store.validate_push(grads)
    assert message in str(err.value)
    assert_unchanged(store, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_policies(bad: float) -> None:
    grads = grads_for(model_vars(), 0)
    grads["emb"][3, 1] = bad
    sparse = {"emb": SparseRows(np.array([2]), np.array([[0.0, bad]], np.float32))}
    for payload in (grads, sparse):
        reject = ModelStore(nonfinite="reject")
        reject.create_model("m", "adam", model_vars())
        before = snapshot(reject)
        with pytest.raises(InvalidArgument, match="gradient for 'emb' contains NaN or Inf"):
            reject.validate_push(payload)
        assert_unchanged(reject, before)

        skip = ModelStore(nonfinite="skip")
        skip.create_model("m", "adam", model_vars())
        assert skip.validate_push(payload) is None

        allow = ModelStore(nonfinite="allow")
        allow.create_model("m", "adam", model_vars())
        assert allow.validate_push(payload) is not None
    # Structural errors win over the non-finite policy, even with skip.
    skip = ModelStore(nonfinite="skip")
    skip.create_model("m", "adam", model_vars())
    grads["dense/bias"] = np.zeros(2, np.float32)
    with pytest.raises(InvalidArgument, match="shape"):
        skip.validate_push(grads)


def test_push_over_tensor_limit_is_resource_exhausted() -> None:
    store = ModelStore(limits=Limits(max_tensor_bytes=100))
    store.create_model("m", "sgd", {"emb": np.zeros((10, 2), np.float32)})
    rows = SparseRows(np.zeros(20, np.int64), np.zeros((20, 2), np.float32))
    with pytest.raises(ResourceExhausted, match="over the limit of 100 bytes"):
        store.validate_push({"emb": rows})


def test_validate_does_not_copy_dense_gradients(store: ModelStore) -> None:
    grads = grads_for(model_vars(), 0)
    prepared = store.validate_push(grads)
    assert all(prepared[n] is grads[n] for n in grads)


def test_byte_swapped_gradient_is_accepted(store: ModelStore) -> None:
    grad = np.arange(3, dtype=">f4")
    prepared = store.validate_push({"dense/bias": grad})
    assert prepared["dense/bias"].dtype == np.float32
    np.testing.assert_array_equal(prepared["dense/bias"], [0, 1, 2])


# --- apply, combine, read ---------------------------------------------------------------
def test_apply_matches_local_optim_core_bit_exactly(store: ModelStore) -> None:
    replay = LocalReplay("adam", model_vars())
    for step in range(3):
        grads = grads_for(model_vars(), step)
        assert store.apply(store.validate_push(grads)) == step + 1
        replay.apply(grads)
    version, weights = store.read()
    assert version == 3
    assert_bitwise_equal(weights, replay.weights())
    # A subset of the variables, and sparse rows.
    sparse = SparseRows(np.array([1, 7, 1]), np.ones((3, 2), np.float32))
    store.apply(store.validate_push({"emb": sparse}))
    replay.apply({"emb": IndexedSlices(sparse.indices, sparse.values)})
    assert_bitwise_equal(store.read()[1], replay.weights())
    assert_state_equal(store.optimizer_state(), (4, list(replay.opt.state_dict().items())))


def test_combine_sums_left_to_right_and_means(store: ModelStore) -> None:
    pushes = [grads_for(model_vars(), i) for i in range(3)]
    prepared = [store.validate_push(p) for p in pushes]
    a, b, c = (p["dense/kernel"] for p in pushes)
    out = store.combine(prepared, reduction="sum")["dense/kernel"]
    assert out.tobytes() == (a + b + c).tobytes()
    assert out.tobytes() != (c + b + a).tobytes()  # the order is visible in the bits
    mean = store.combine(prepared, reduction="mean")["dense/kernel"]
    assert mean.tobytes() == ((a + b + c) / np.float32(3)).tobytes()
    scaled = store.combine(prepared[:2], reduction="sum", scale=1.5)["dense/kernel"]
    assert scaled.tobytes() == ((a + b) * np.float32(1.5)).tobytes()
    assert a.tobytes() == pushes[0]["dense/kernel"].tobytes()  # inputs untouched


def test_combine_sparse_and_mixed(store: ModelStore) -> None:
    s1 = SparseRows(np.array([1, 3]), np.ones((2, 2), np.float32))
    s2 = SparseRows(np.array([3]), np.full((1, 2), 2.0, np.float32))
    dense = np.full((10, 2), 0.5, np.float32)
    p1, p2, p3 = (store.validate_push({"emb": v}) for v in (s1, s2, dense))
    both = store.combine([p1, p2], reduction="sum")["emb"]
    assert isinstance(both, IndexedSlices)
    np.testing.assert_array_equal(both.indices, [1, 3, 3])
    mixed = store.combine([p1, p3, p2], reduction="mean")["emb"]
    want = dense.copy()
    want[1] += 1
    want[3] += 3
    np.testing.assert_array_equal(mixed, want / np.float32(3))


def test_read_names_and_rows(store: ModelStore) -> None:
    version, out = store.read(["scale", "dense/bias"])
    assert version == 0 and list(out) == ["scale", "dense/bias"]
    assert out["scale"].shape == ()
    _, rows = store.read(rows={"emb": np.array([9, 0, 9])})
    assert list(rows) == ["emb"]
    assert isinstance(rows["emb"], SparseRows)
    np.testing.assert_array_equal(rows["emb"].values, model_vars()["emb"][[9, 0, 9]])
    _, both = store.read(["scale"], rows={"emb": [2]})
    assert list(both) == ["scale", "emb"]
    with pytest.raises(NotFound, match="nope"):
        store.read(["nope"])
    with pytest.raises(InvalidArgument, match=r"must be in \[0, 10\); got rows in \[0, 10\]"):
        store.read(rows={"emb": [0, 10]})
    with pytest.raises(InvalidArgument, match="scalar"):
        store.read(rows={"scale": [0]})
    with pytest.raises(InvalidArgument, match="1-D list of integers"):
        store.read(rows={"emb": [[1]]})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_dtypes_empty_and_scalar_variables(dtype: str) -> None:
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    variables = {
        "w": np.arange(6).reshape(2, 3).astype(dt),
        "empty": np.zeros((0, 3), dt),
        "s": np.array(2.0, dt),
    }
    store = ModelStore()
    store.create_model("m", "adam", variables)
    replay = LocalReplay("adam", variables)
    grads = {n: (np.ones(v.shape) * 0.25).astype(dt) for n, v in variables.items()}
    store.apply(store.validate_push(grads))
    replay.apply(grads)
    assert_bitwise_equal(store.read()[1], replay.weights())
    with pytest.raises(InvalidArgument, match=f"has dtype float32, expected {dt.name}"):
        store.validate_push({"w": np.zeros((2, 3), np.float32)})


# --- waiting ----------------------------------------------------------------------------
def test_wait_for_version(store: ModelStore) -> None:
    waiting = count_waiters(store)
    assert store.wait_for_version(0, 0.0) == 0
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"version 1 was not reached within 0\.1 s"):
        store.wait_for_version(1, 0.1)
    # It waited out its timeout (a slow machine only makes that longer), and then returned:
    # the upper bound only catches a wait that ignores its timeout.
    assert 0.09 <= time.monotonic() - started < WAIT_S  # 0.09: float rounding

    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(store.wait_for_version(1, WAIT_S)))
    waiter.start()
    wait_until(lambda: waiting() == 1)  # parked on the condition: the apply must wake it
    store.apply(store.validate_push(grads_for(model_vars(), 0)))
    waiter.join(WAIT_S)
    assert got == [1]


def test_close_wakes_version_waiters(store: ModelStore) -> None:
    errors: list[Exception] = []

    def wait() -> None:
        try:
            store.wait_for_version(5, None)
        except Exception as exc:
            errors.append(exc)

    waiting = count_waiters(store)
    threads = [threading.Thread(target=wait) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: waiting() == 3)  # all three parked: close() must wake them
    store.close()
    for t in threads:
        t.join(WAIT_S)
    assert len(errors) == 3 and all(isinstance(e, Unavailable) for e in errors)
    with pytest.raises(Unavailable):
        store.wait_for_version(1, 1.0)
    assert store.wait_for_version(0, 1.0) == 0  # already reached: no need to wait


# --- hyperparameters --------------------------------------------------------------------
def test_hyperparameters_live_change_matches_local(store: ModelStore) -> None:
    hp = store.hyperparameters()
    assert set(hp) >= {"learning_rate", "beta_1", "beta_2", "epsilon"}
    assert hp["learning_rate"] == pytest.approx(0.001)
    replay = LocalReplay("adam", model_vars())
    grads = grads_for(model_vars(), 0)
    store.apply(store.validate_push(grads))
    replay.apply(grads)
    new = store.set_hyperparameters({"learning_rate": 0.01, "beta_1": 0.5})
    assert new["beta_1"] == 0.5 and new["learning_rate"] == pytest.approx(0.01)
    assert store.optimizer_config()["config"]["beta_1"] == 0.5
    replay.opt.learning_rate = 0.01
    replay.opt.beta_1 = 0.5
    grads = grads_for(model_vars(), 1)
    assert store.apply(store.validate_push(grads)) == 2
    replay.apply(grads)
    assert_bitwise_equal(store.read()[1], replay.weights())


@pytest.mark.parametrize(
    ("values", "error", "needle"),
    [
        ({"nope": 1.0}, InvalidArgument, "unknown hyperparameter 'nope'; this optimizer accepts"),
        ({"learning_rate": float("nan")}, InvalidArgument, "must be finite"),
        ({"learning_rate": "fast"}, InvalidArgument, "must be a number"),
        # The optimizer's own constructor check; the valid learning rate is not applied either.
        ({"learning_rate": 0.5, "momentum": 2.0}, InvalidArgument, "momentum"),
    ],
)
def test_set_hyperparameters_validates_everything_first(values, error, needle) -> None:
    store = ModelStore()
    store.create_model("m", {"class_name": "SGD", "config": {"momentum": 0.5}}, model_vars())
    before = snapshot(store)
    with pytest.raises(error) as err:
        store.set_hyperparameters(values)
    assert needle in str(err.value)
    assert_unchanged(store, before)


def test_learning_rate_schedule_is_not_settable() -> None:
    schedule = {
        "module": "keras.optimizers.schedules",
        "class_name": "ExponentialDecay",
        "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5},
        "registered_name": None,
    }
    store = ModelStore()
    store.create_model(
        "m", {"class_name": "SGD", "config": {"learning_rate": schedule}}, model_vars()
    )
    assert store.hyperparameters()["learning_rate"] == pytest.approx(0.1)
    with pytest.raises(FailedPrecondition, match="schedule"):
        store.set_hyperparameters({"learning_rate": 0.5})


# --- optimizer state and whole-model state ----------------------------------------------
def test_optimizer_state_round_trip(store: ModelStore) -> None:
    store.apply(store.validate_push(grads_for(model_vars(), 0)))
    version, items = store.optimizer_state()
    assert version == 1 and items[0][0] == "iteration"
    other = ModelStore()
    other.create_model("m", "adam", model_vars())
    assert other.set_optimizer_state(dict(items)) == 1
    assert_state_equal(other.optimizer_state(), (version, items))
    before = snapshot(other)
    bad = dict(items)
    bad["emb_momentum"] = np.zeros((3, 3), np.float32)
    with pytest.raises(InvalidArgument, match="emb_momentum"):
        other.set_optimizer_state(bad)
    del bad["emb_momentum"]
    with pytest.raises(InvalidArgument, match="missing keys"):
        other.set_optimizer_state(bad)
    assert_unchanged(other, before)


def test_export_import_round_trip_continues_identically(store: ModelStore) -> None:
    for step in range(2):
        store.apply(store.validate_push(grads_for(model_vars(), step)))
    state = store.export_state()
    assert state.version == 2 and state.model_name == "m"
    restored = ModelStore()
    restored.import_state(state)
    assert restored.version == 2
    assert_bitwise_equal(restored.read()[1], store.read()[1])
    grads = grads_for(model_vars(), 7)
    store.apply(store.validate_push(grads))
    restored.apply(restored.validate_push(grads))
    assert_bitwise_equal(restored.read()[1], store.read()[1])
    assert_state_equal(restored.optimizer_state(), store.optimizer_state())


def _broken_states(good: ModelState) -> list[tuple[ModelState, str]]:
    def edit(**changes) -> ModelState:
        fields = {**good.__dict__, **changes}
        return ModelState(**fields)

    missing = dict(good.optimizer_state)
    del missing["emb_velocity"]
    wrong_shape = {**good.optimizer_state, "emb_velocity": np.zeros((3,), np.float32)}
    return [
        (edit(optimizer_state=missing), "missing keys ['emb_velocity']"),
        (edit(optimizer_state=wrong_shape), "'emb_velocity' has shape (10, 2)"),
        (edit(version=7), "version 7"),
        (edit(optimizer={"class_name": "Nope"}), "Nope"),
        (edit(optimizer="sgd"), "unexpected keys"),
        (edit(variables={**good.variables, "emb": np.zeros((10, 2), np.int64)}), "int64"),
        (edit(variables={}), "at least one variable"),
    ]


def test_import_state_validates_before_swapping(store: ModelStore) -> None:
    store.apply(store.validate_push(grads_for(model_vars(), 0)))
    other = ModelStore()
    other.create_model("other", "adam", model_vars(seed=3))
    good = other.export_state()
    generation = store.generation
    before = snapshot(store)
    for bad, needle in _broken_states(good):
        with pytest.raises(InvalidArgument) as err:
            store.import_state(bad)
        assert needle in str(err.value), str(err.value)
        assert_unchanged(store, before)
        assert store.model_name == "m" and store.generation == generation


def test_loss_scale_optimizer_with_allow_policy_skips_nonfinite_steps() -> None:
    config = {
        "class_name": "LossScaleOptimizer",
        "config": {"inner_optimizer": {"class_name": "SGD", "config": {}}, "initial_scale": 4.0},
    }
    store = ModelStore(nonfinite="allow")
    store.create_model("m", config, model_vars())
    grads = grads_for(model_vars(), 0)
    grads["scale"] = np.array(np.inf, np.float32)
    assert store.apply(store.validate_push(grads)) == 0  # skipped: version does not move
    assert_bitwise_equal(store.read()[1], model_vars())
    state = dict(store.optimizer_state()[1])
    assert state["dynamic_scale"] == np.float32(2.0)


def test_no_cupy_import_on_the_cpu_path() -> None:
    code = (
        "import sys, numpy as np\n"
        "from paramserve.server.store import ModelStore\n"
        "from paramserve.server.aggregator import Aggregator, AggregationConfig\n"
        "import paramserve.server.snapshots\n"
        "w = {'w': np.ones(3, np.float32)}\n"
        "s = ModelStore(device='cpu'); s.create_model('m', 'adam', w)\n"
        "Aggregator(s, AggregationConfig(mode='async')).push('w', 1, 0, w)\n"
        "s.read(rows={'w': [1]})\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_store_options() -> None:
    with pytest.raises(ValueError, match="nonfinite"):
        ModelStore(nonfinite="ignore")
    with pytest.raises(ValueError, match="device"):
        ModelStore(device="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not optim_core.gpu_available(), reason="needs a usable CUDA GPU with CuPy")
def test_gpu_store_matches_cpu() -> None:
    gpu, cpu = ModelStore(device="gpu"), ModelStore(device="cpu")
    for s in (gpu, cpu):
        s.create_model("m", "adam", model_vars())
    assert gpu.device == "gpu"
    sparse = SparseRows(np.array([1, 7, 1]), np.ones((3, 2), np.float32))
    for step in range(3):
        grads = grads_for(model_vars(), step)
        pushes = [gpu.validate_push(grads), gpu.validate_push({"emb": sparse})]
        assert gpu.apply(gpu.combine(pushes, reduction="mean")) == step + 1
        cpu.apply(
            cpu.combine(
                [cpu.validate_push(grads), cpu.validate_push({"emb": sparse})], reduction="mean"
            )
        )
    version, weights = gpu.read()
    assert version == 3
    for name, want in cpu.read()[1].items():
        assert type(weights[name]) is np.ndarray
        np.testing.assert_allclose(weights[name], want, rtol=1e-5, atol=1e-6)
    rows = gpu.read(rows={"emb": [7]})[1]["emb"]
    assert type(rows.values) is np.ndarray
    restored = ModelStore(device="gpu")
    restored.import_state(gpu.export_state())
    assert_state_equal(restored.optimizer_state(), gpu.optimizer_state())
    wait_until(lambda: True)
