"""Keras training against a real daemon equals local Keras: JAX (eager and jit) and torch.

Each test runs :mod:`tests.keras.scenarios` in a subprocess with the backend set (Keras
fixes its backend at import; the suite runs on numpy). A tiny classifier trains for 3
epochs of 4 batches; "relative" below is ||remote - local|| / ||local|| per variable.

Where exact equality is not expected, the reasons are measured, not assumed:

- JAX eager: the server is bit-exact with Keras once the reference's ``pow`` is C's powf
  (as Keras's numpy backend and optim_core compute it); XLA's pow differs by one ulp at
  some exponents (0.9**4), which reaches Adam-family updates and decay schedules.
- JAX jit: XLA fuses the reference's update (FMA, reassociation): within 1e-6 relative.
- torch: Keras's torch backend swaps in its own optimizer classes (``torch._foreach``
  kernels, e.g. an add with ``alpha`` rounded once), so only Lion is bit-exact.
- LossScaleOptimizer and gradient accumulation run in ``lax.cond`` on JAX, which XLA
  compiles even in eager mode.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .daemon import REPO, clean_env, daemon

CASES = ["adam", "adamw_exclusions", "sgd_schedule", "lion_ema"]
TOLERANCE = 1e-6
TIMEOUT_S = 300


def scenario(backend: str, name: str, **arguments: Any) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.keras.scenarios", name, json.dumps(arguments)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=clean_env(KERAS_BACKEND=backend),
        cwd=REPO,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


def check_common(result: dict[str, Any], case: str) -> None:
    """What every fit must show: iterations mirror the server, the config is the server's,
    and exclusions from weight decay reached the server by path."""
    assert result["iterations"] == result["server_version"] == 12
    assert result["get_config_is_servers"]
    if case == "adamw_exclusions":
        assert result["exclusions"] == {"var_names": ["bias"], "var_paths": ["net/out/kernel"]}
    else:
        assert result["exclusions"] is None


def test_fit_on_jax_eager_and_jit_matches_local_keras() -> None:
    results = scenario("jax", "fit_matrix", cases=CASES, modes=["eager", "jit"])
    for case in CASES:
        eager, jit = results[f"eager/{case}"], results[f"jit/{case}"]
        check_common(eager, case)
        check_common(jit, case)
        assert eager["vs_reference"] == {"exact": True, "max_rel": 0.0}, case
        assert eager["vs_plain_keras"]["max_rel"] <= TOLERANCE, case
        assert jit["vs_plain_keras"]["max_rel"] <= TOLERANCE, case
    # No pow in these two: bit-exact with plain Keras in eager mode too.
    assert results["eager/sgd_schedule"]["vs_plain_keras"]["exact"]
    assert results["eager/lion_ema"]["vs_plain_keras"]["exact"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_fit_on_torch_matches_local_keras() -> None:
    results = scenario("torch", "fit_matrix", cases=CASES, modes=["eager"])
    for case in CASES:
        result = results[f"eager/{case}"]
        check_common(result, case)
        assert result["vs_plain_keras"]["max_rel"] <= TOLERANCE, case
    assert results["eager/lion_ema"]["vs_plain_keras"]["exact"]


def test_custom_loop_callbacks_save_and_loss_scaling_on_jax(tmp_path: Path) -> None:
    results = scenario("jax", "features", tmp=str(tmp_path))

    loop = results["custom_loop"]  # apply_gradients(zip(grads, vars)); lr assigned halfway
    assert loop["exact"], loop
    assert loop["server_learning_rate"] == pytest.approx(5e-3, rel=1e-7)
    assert loop["iterations"] == loop["server_version"] == 6

    for mode in ("eager", "jit"):  # LearningRateScheduler + ReduceLROnPlateau
        callbacks = results[f"callbacks/{mode}"]
        assert callbacks["max_rel"] <= TOLERANCE, callbacks
        # The scheduler sets 0.01 / (epoch + 1) at each epoch start (ReduceLROnPlateau halves
        # at each end, overridden at the next start); the server had each for the epoch.
        assert callbacks["server_rates_in_first_steps"] == pytest.approx(
            [0.01, 0.005, 0.01 / 3, 0.0025], rel=1e-7
        )
        assert callbacks["server_rate_after_fit"] == callbacks["local_rate_after_fit"]
        assert callbacks["server_rate_after_fit"] == pytest.approx(0.00125, rel=1e-7)
        assert callbacks["get_config_is_servers"]
        assert callbacks["get_config_learning_rate"] == callbacks["server_rate_after_fit"]
        assert callbacks["iterations"] == callbacks["server_version"] == 16
    assert results["callbacks/eager"]["exact"]

    saved = results["save"]
    assert saved["markers_found"] == dict.fromkeys(["address", "port", "worker_id", "token"], False)
    assert saved["saved_optimizer"]["class_name"] == "RemoteOptimizer"
    assert saved["saved_optimizer"]["config"]["beta_1"] == 0.9  # the server's Adam config
    assert saved["weights_reload"]
    assert "compile=False" in saved["load_with_compile_error"]

    for mode in ("eager", "jit"):
        # Dynamic scale: 12 steps from 2**110, some overflow (skipped, scale halved), some
        # finite (applied; doubled every 2): the same steps were skipped on both sides.
        lso = results[f"loss_scale_optimizer/{mode}"]
        assert lso["max_rel"] <= TOLERANCE, lso
        assert lso["local_scale"] == lso["server_scale"] == lso["client_scale"] == 2.0**108
        assert lso["iterations"] == lso["local_iterations"] == 7
        static = results[f"loss_scale_factor/{mode}"]
        assert static["max_rel"] <= TOLERANCE, static
        assert static["local_scale"] == static["server_scale"] == static["client_scale"] == 128
        assert static["iterations"] == static["local_iterations"] == 12
    assert results["loss_scale_factor/eager"]["exact"]

    mixed = results["mixed_float16"]  # Keras's own LossScaleOptimizer around ours (client)
    assert mixed["wrapper"] == "LossScaleOptimizer"
    assert mixed["max_rel"] <= TOLERANCE, mixed
    assert mixed["remote"] == mixed["local"]  # the same steps skipped, the same final scale


def test_two_workers_in_sync_with_mean_match_one_worker_on_the_combined_batch() -> None:
    """Each worker fits its half of every batch (jit); the server averages the two gradients
    of each round. A single worker on the combined 16-sample batches (local Keras, which the
    tests above show one remote worker equals) ends within 1e-6 relative: the mean of two
    half-batch gradients and the full-batch gradient differ only in rounding."""
    with daemon("--mode", "sync", "--replicas", "2", "--reduction", "mean") as server:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.keras.scenarios",
                    "worker",
                    json.dumps({"address": server.address, "rank": r, "reference": r == 0}),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=clean_env(KERAS_BACKEND="jax"),
                cwd=REPO,
            )
            for r in range(2)
        ]
        outputs = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=TIMEOUT_S)
                assert proc.returncode == 0, out[-4000:] + "\n" + server.log()
                outputs.append(json.loads(out.splitlines()[-1][len("RESULT ") :]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    assert [o["iterations"] for o in outputs] == [12, 12]
    assert outputs[0]["max_rel"] <= TOLERANCE, outputs[0]
