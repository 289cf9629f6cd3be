"""Keras on the TensorFlow backend against a real daemon, where TensorFlow is installed.

TensorFlow is not in the test extra: once it is importable, Keras imports it inside
``serialize_keras_object`` in every process (its ``tf.available`` check), which would load
TensorFlow into the whole suite's Keras tests (the numpy-backend conformance suite too).
Run these in an environment that has it: ``pip install tensorflow-cpu==2.21.0``.

``fit`` runs in Keras's default ``tf.function`` graph (the step is a ``tf.numpy_function``;
the first trace connects in ``tf.init_scope``) and with ``run_eagerly=True``. XLA
(``jit_compile=True``) cannot compile a host call: RemoteOptimizer says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .test_training import CASES, TOLERANCE, check_common, scenario

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed"
)


def test_fit_on_tensorflow_matches_local_keras() -> None:
    results = scenario("tensorflow", "fit_matrix", cases=CASES, modes=["eager", "run_eagerly"])
    for mode in ("eager", "run_eagerly"):
        for case in CASES:
            result = results[f"{mode}/{case}"]
            check_common(result, case)
            assert result["vs_plain_keras"]["max_rel"] <= TOLERANCE, (mode, case)
        for case in ("sgd_schedule", "lion_ema"):
            assert results[f"{mode}/{case}"]["vs_plain_keras"]["exact"], (mode, case)


def test_xla_is_refused_with_a_clear_error() -> None:
    with pytest.raises(AssertionError, match="compile the model with jit_compile=False"):
        scenario("tensorflow", "fit_matrix", cases=["adam"], modes=["jit"])


def test_custom_loop_callbacks_save_and_loss_scaling_on_tensorflow(tmp_path: Path) -> None:
    results = scenario("tensorflow", "features", tmp=str(tmp_path))
    loop = results["custom_loop"]  # GradientTape, apply_gradients, lr assigned halfway
    assert loop["max_rel"] <= TOLERANCE, loop
    assert loop["server_learning_rate"] == pytest.approx(5e-3, rel=1e-7)
    for mode in ("eager", "run_eagerly"):
        callbacks = results[f"callbacks/{mode}"]
        assert callbacks["exact"], callbacks
        assert callbacks["server_rate_after_fit"] == pytest.approx(0.00125, rel=1e-7)
    assert not any(results["save"]["markers_found"].values())
    for key in (
        "loss_scale_optimizer/eager",
        "loss_scale_optimizer/run_eagerly",
        "loss_scale_factor/eager",
        "loss_scale_factor/run_eagerly",
        "mixed_float16",
    ):
        assert results[key]["exact"], (key, results[key])
    lso = results["loss_scale_optimizer/eager"]
    assert lso["local_scale"] == lso["server_scale"] == lso["client_scale"]
