"""Learning-rate schedules against real Keras 3.15.1 (numpy backend): values bit for bit,
configs, serialization both ways and constructor validation."""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from paramserve.optim_core import schedules

# Real Keras is the reference; tests/conftest.py has set KERAS_BACKEND=numpy before this.
keras = pytest.importorskip("keras")
K = keras.optimizers.schedules

# (class name, constructor kwargs). Small decay_steps so that steps 0..200 cross many
# boundaries, periods and restarts; every value is compared at each step.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": 7, "decay_rate": 0.93}),
    (
        "ExponentialDecay",
        {"initial_learning_rate": 0.01, "decay_steps": 5, "decay_rate": 0.8, "staircase": True},
    ),
    ("ExponentialDecay", {"initial_learning_rate": 3.0, "decay_steps": 1, "decay_rate": 1.07}),
    (
        "ExponentialDecay",
        {"initial_learning_rate": 0.1, "decay_steps": 2.5, "decay_rate": 0.5, "name": "ed"},
    ),
    ("PiecewiseConstantDecay", {"boundaries": [3, 10, 50], "values": [1.0, 0.5, 0.1, 0.01]}),
    ("PiecewiseConstantDecay", {"boundaries": [0], "values": [0.3, 0.2]}),
    # Fractional boundaries are truncated to the step's integer dtype (2.5 -> 2, 10.9 -> 10).
    ("PiecewiseConstantDecay", {"boundaries": [2.5, 10.9, 99.99], "values": [1.0, 0.5, 0.1, 7e-3]}),
    ("PiecewiseConstantDecay", {"boundaries": (20, 40), "values": (0.1, -0.0, 1e-30)}),
    # Keras sums indicator * value over all intervals, so an inf value gives NaN everywhere.
    ("PiecewiseConstantDecay", {"boundaries": [3], "values": [1.0, float("inf")]}),
    ("PolynomialDecay", {"initial_learning_rate": 0.1, "decay_steps": 13}),
    (
        "PolynomialDecay",
        {"initial_learning_rate": 0.1, "decay_steps": 13, "power": 0.5, "end_learning_rate": 3e-3},
    ),
    ("PolynomialDecay", {"initial_learning_rate": 0.1, "decay_steps": 17, "power": 2.7}),
    (
        "PolynomialDecay",
        {"initial_learning_rate": 0.1, "decay_steps": 13, "power": 0.5, "cycle": True},
    ),
    (
        "PolynomialDecay",
        {
            "initial_learning_rate": 0.05,
            "decay_steps": 7,
            "end_learning_rate": 0.06,
            "power": 3.0,
            "cycle": True,
        },
    ),
    ("InverseTimeDecay", {"initial_learning_rate": 0.1, "decay_steps": 7, "decay_rate": 0.3}),
    (
        "InverseTimeDecay",
        {"initial_learning_rate": 0.1, "decay_steps": 7, "decay_rate": 0.3, "staircase": True},
    ),
    ("InverseTimeDecay", {"initial_learning_rate": 1e-3, "decay_steps": 1, "decay_rate": 2.9}),
    ("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 37}),
    ("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 37, "alpha": 0.13}),
    ("CosineDecay", {"initial_learning_rate": 0.7, "decay_steps": 1, "alpha": 0.5}),
    (
        "CosineDecay",
        {
            "initial_learning_rate": 0.001,
            "decay_steps": 30,
            "warmup_target": 0.01,
            "warmup_steps": 10,
        },
    ),
    (
        "CosineDecay",
        {
            "initial_learning_rate": 0.0,
            "decay_steps": 37,
            "alpha": 0.1,
            "warmup_target": 0.05,
            "warmup_steps": 11,
        },
    ),
    # A target with zero warmup steps: pure decay starting from the target.
    (
        "CosineDecay",
        {"initial_learning_rate": 0.2, "decay_steps": 40, "warmup_target": 0.05},
    ),
    # Warmup downwards (target below the initial rate).
    (
        "CosineDecay",
        {
            "initial_learning_rate": 0.3,
            "decay_steps": 50,
            "warmup_target": 0.1,
            "warmup_steps": 25,
            "alpha": 0.2,
        },
    ),
    ("CosineDecayRestarts", {"initial_learning_rate": 0.1, "first_decay_steps": 9}),
    (
        "CosineDecayRestarts",
        {"initial_learning_rate": 0.1, "first_decay_steps": 9, "t_mul": 1.0},
    ),
    (
        "CosineDecayRestarts",
        {
            "initial_learning_rate": 0.1,
            "first_decay_steps": 9,
            "t_mul": 1.0,
            "m_mul": 0.8,
            "alpha": 0.05,
        },
    ),
    (
        "CosineDecayRestarts",
        {
            "initial_learning_rate": 0.1,
            "first_decay_steps": 9,
            "t_mul": 1.7,
            "m_mul": 0.6,
            "alpha": 0.2,
        },
    ),
    (
        "CosineDecayRestarts",
        {"initial_learning_rate": 0.02, "first_decay_steps": 4, "t_mul": 3.0, "m_mul": 1.5},
    ),
    # t_mul < 1: periods shrink and the log argument eventually goes negative (NaN in Keras
    # too); the comparison is on the raw bits, so the NaNs must match as well.
    (
        "CosineDecayRestarts",
        {"initial_learning_rate": 0.1, "first_decay_steps": 9, "t_mul": 0.5},
    ),
]

STEPS = [*range(0, 201), 997, 1000, 1001, 10**4, 123_457, 10**6, 2**24 + 1, 10**9]


def _ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{name}-{i}" for i, (name, _) in enumerate(cases)]


def _pair(name: str, kwargs: dict[str, Any]) -> tuple[Any, schedules.LearningRateSchedule]:
    return getattr(K, name)(**kwargs), getattr(schedules, name)(**kwargs)


def _bits(value: Any) -> tuple[str, bytes]:
    arr = np.asarray(value)
    return arr.dtype.name, arr.tobytes()


def _assert_same_values(k_sched: Any, ours: schedules.LearningRateSchedule, steps: list) -> None:
    """Bit-exact equality (dtype and raw bytes, so NaN payloads and -0.0 count too)."""
    with np.errstate(all="ignore"):
        for step in steps:
            got = ours(step)
            assert isinstance(got, np.generic), type(got)
            assert _bits(got) == _bits(k_sched(step)), (step, got, k_sched(step))


def _normalize(config: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip: tuples become lists on both sides."""
    return json.loads(json.dumps(config))


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
def test_values_match_keras_bit_for_bit(name: str, kwargs: dict[str, Any]) -> None:
    k_sched, ours = _pair(name, kwargs)
    _assert_same_values(k_sched, ours, STEPS)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
def test_get_config_matches_keras(name: str, kwargs: dict[str, Any]) -> None:
    k_sched, ours = _pair(name, kwargs)
    assert ours.get_config() == k_sched.get_config()
    assert list(ours.get_config()) == list(k_sched.get_config())  # same key order


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
def test_serialize_round_trip(name: str, kwargs: dict[str, Any]) -> None:
    _, ours = _pair(name, kwargs)
    blob = schedules.serialize(ours)
    assert blob["module"] == "keras.optimizers.schedules"
    assert blob["class_name"] == name
    assert blob["registered_name"] is None
    again = schedules.deserialize(json.loads(json.dumps(blob)))
    assert type(again) is type(ours)
    assert _normalize(again.get_config()) == _normalize(ours.get_config())
    _assert_same_values(ours, again, STEPS)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
def test_keras_export_deserializes_here(name: str, kwargs: dict[str, Any]) -> None:
    k_sched = getattr(K, name)(**kwargs)
    exported = json.loads(json.dumps(K.serialize(k_sched)))
    ours = schedules.deserialize(exported)
    assert type(ours).__name__ == name
    assert _normalize(ours.get_config()) == _normalize(k_sched.get_config())
    _assert_same_values(k_sched, ours, STEPS)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
def test_our_export_deserializes_in_keras(name: str, kwargs: dict[str, Any]) -> None:
    ours = getattr(schedules, name)(**kwargs)
    blob = json.loads(json.dumps(schedules.serialize(ours)))
    k_sched = K.deserialize(blob)
    assert type(k_sched).__name__ == name
    assert _normalize(k_sched.get_config()) == _normalize(ours.get_config())
    _assert_same_values(k_sched, ours, STEPS)


def test_serialized_dict_equals_keras_serialize() -> None:
    for name, kwargs in CASES:
        k_sched, ours = _pair(name, kwargs)
        assert schedules.serialize(ours) == K.serialize(k_sched)


REQUIRED: dict[str, dict[str, Any]] = {
    "ExponentialDecay": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.9},
    "PiecewiseConstantDecay": {"boundaries": [10], "values": [0.1, 0.01]},
    "PolynomialDecay": {"initial_learning_rate": 0.1, "decay_steps": 10},
    "InverseTimeDecay": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5},
    "CosineDecay": {"initial_learning_rate": 0.1, "decay_steps": 10},
    "CosineDecayRestarts": {"initial_learning_rate": 0.1, "first_decay_steps": 10},
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_defaults_match_keras(name: str) -> None:
    k_sched, ours = _pair(name, REQUIRED[name])
    assert ours.get_config() == k_sched.get_config()  # includes the default ``name``
    assert ours.name == k_sched.name


def test_default_names() -> None:
    names = {name: getattr(schedules, name)(**kw).name for name, kw in REQUIRED.items()}
    assert names == {
        "ExponentialDecay": "ExponentialDecay",
        "PiecewiseConstantDecay": "PiecewiseConstant",
        "PolynomialDecay": "PolynomialDecay",
        "InverseTimeDecay": "InverseTimeDecay",
        "CosineDecay": "CosineDecay",
        "CosineDecayRestarts": "SGDRDecay",
    }


def test_registry_holds_the_six_schedules() -> None:
    assert set(schedules._SCHEDULES) == set(REQUIRED)
    for name, cls in schedules._SCHEDULES.items():
        assert cls is getattr(schedules, name)
        assert issubclass(cls, schedules.LearningRateSchedule)


# --- validation ------------------------------------------------------------------------------
def _keras_error(fn: Any) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("name", sorted(set(REQUIRED) - {"PiecewiseConstantDecay"}))
@pytest.mark.parametrize("bad", [0, -1, -2.5])
def test_nonpositive_decay_steps_raise_like_keras(name: str, bad: float) -> None:
    key = "first_decay_steps" if name == "CosineDecayRestarts" else "decay_steps"
    kwargs = {**REQUIRED[name], key: bad}
    expected = _keras_error(lambda: getattr(K, name)(**kwargs))
    with pytest.raises(ValueError) as info:
        getattr(schedules, name)(**kwargs)
    assert str(info.value) == expected
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("boundaries", "values"),
    [([10, 20], [0.1, 0.01]), ([10], [0.1, 0.01, 0.001]), ([], []), ([10], [])],
)
def test_piecewise_length_mismatch_raises_like_keras(boundaries: list, values: list) -> None:
    expected = _keras_error(lambda: K.PiecewiseConstantDecay(boundaries, values))
    with pytest.raises(ValueError) as info:
        schedules.PiecewiseConstantDecay(boundaries, values)
    assert str(info.value) == expected


def test_piecewise_without_boundaries_fails_on_call_like_keras() -> None:
    k_sched, ours = _pair("PiecewiseConstantDecay", {"boundaries": [], "values": [0.25]})
    with pytest.raises(IndexError):  # Keras indexes boundaries[0]; we fail the same way
        k_sched(0)
    with pytest.raises(IndexError):
        ours(0)


def test_unknown_class_raises() -> None:
    with pytest.raises(ValueError, match="Unknown learning rate schedule"):
        schedules.deserialize({"class_name": "NoSuchDecay", "config": {}})


def test_bare_dict_without_module_is_accepted_here() -> None:
    # Keras requires "module" (spec section 4); accepting a bare dict is a deliberate extra.
    ours = schedules.deserialize(
        {"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 9}}
    )
    _assert_same_values(K.CosineDecay(0.1, 9), ours, STEPS)


# --- dtypes other than a Python float --------------------------------------------------------
# Keras computes in the dtype of ``initial_learning_rate`` converted to a tensor (float64 is
# narrowed to float32, a Python int gives int32, so float hyper-parameters get truncated).
# We follow its dtype rules, so these match bit for bit as well.
DTYPE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("ExponentialDecay", {"initial_learning_rate": 2, "decay_steps": 7, "decay_rate": 2.5}),
    (
        "ExponentialDecay",
        {"initial_learning_rate": np.float16(0.3), "decay_steps": 7, "decay_rate": 0.9},
    ),
    (
        "ExponentialDecay",
        {"initial_learning_rate": np.float64(0.3), "decay_steps": 7, "decay_rate": 0.9},
    ),
    ("PiecewiseConstantDecay", {"boundaries": [5, 9], "values": [3, 2, 1]}),
    ("PiecewiseConstantDecay", {"boundaries": [5], "values": [np.float16(0.3), np.float16(0.1)]}),
    (
        "PolynomialDecay",
        {"initial_learning_rate": 2, "decay_steps": 13, "power": 2.0, "cycle": True},
    ),
    (
        "PolynomialDecay",
        {"initial_learning_rate": np.float16(0.1), "decay_steps": 13, "cycle": True},
    ),
    ("InverseTimeDecay", {"initial_learning_rate": 3, "decay_steps": 7, "decay_rate": 1.5}),
    (
        "InverseTimeDecay",
        {"initial_learning_rate": np.float32(0.1), "decay_steps": 7, "decay_rate": 0.3},
    ),
    (
        "CosineDecay",
        {"initial_learning_rate": 1, "decay_steps": 37, "warmup_target": 3.7, "warmup_steps": 10},
    ),
    (
        "CosineDecay",
        {
            "initial_learning_rate": np.float16(0.1),
            "decay_steps": 37,
            "alpha": 0.1,
            "warmup_target": 0.5,
            "warmup_steps": 10,
        },
    ),
    (
        "CosineDecay",
        {"initial_learning_rate": ml_dtypes.bfloat16(0.1), "decay_steps": 37, "alpha": 0.1},
    ),
    ("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 37, "alpha": np.float64(0.13)}),
    (
        "CosineDecayRestarts",
        {"initial_learning_rate": 2, "first_decay_steps": 9, "t_mul": 3, "m_mul": 0.5},
    ),
    (
        "CosineDecayRestarts",
        {
            "initial_learning_rate": np.float16(0.1),
            "first_decay_steps": 9,
            "t_mul": 1.5,
            "m_mul": 0.5,
        },
    ),
]


@pytest.mark.parametrize(("name", "kwargs"), DTYPE_CASES, ids=_ids(DTYPE_CASES))
def test_other_dtypes_match_keras_bit_for_bit(name: str, kwargs: dict[str, Any]) -> None:
    k_sched, ours = _pair(name, kwargs)
    _assert_same_values(k_sched, ours, STEPS[:120])


def test_python_float_gives_float32() -> None:
    with np.errstate(all="ignore"):
        for name, kwargs in CASES:
            assert type(getattr(schedules, name)(**kwargs)(3)) is np.float32


@pytest.mark.parametrize("step_type", [int, np.int32, np.int64])
def test_numpy_integer_steps(step_type: type) -> None:
    for name, kwargs in CASES[::3]:
        k_sched, ours = _pair(name, kwargs)
        with np.errstate(all="ignore"):
            for step in (0, 1, 9, 10, 57, 200):
                assert _bits(ours(step_type(step))) == _bits(k_sched(step))


def test_schedule_in_keras_optimizer_config_round_trips() -> None:
    # The schedule dict sits inside optimizer configs; Keras must restore it from ours.
    ours = schedules.CosineDecay(0.001, 30, warmup_target=0.01, warmup_steps=10)
    opt = keras.optimizers.SGD(learning_rate=K.deserialize(schedules.serialize(ours)))
    exported = json.loads(json.dumps(keras.optimizers.serialize(opt)))
    k_sched = K.deserialize(exported["config"]["learning_rate"])
    again = schedules.deserialize(exported["config"]["learning_rate"])
    _assert_same_values(k_sched, again, STEPS)
    _assert_same_values(k_sched, ours, STEPS)
