"""The stored Keras references (tests/optim/keras_references.npz) are current and are Keras's.

The conformance suite compares optim_core with Keras results recorded once by
``python -m tests.optim.record_references``. These tests fail when that recording is stale
(another Keras pin, other recording code, a case added or changed) and, on every run, run a
spread of the cases in live Keras and demand the stored results bit for bit.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from . import references
from .harness import RunResult, run_keras
from .test_conformance import UNSTABLE_NAME

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

RECORD = "python -m tests.optim.record_references"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# Every 13th Keras run of the suite, in live Keras: each optimizer, options, shapes, dtypes.
LIVE_JOBS = references.jobs()[::13]


def test_keras_pin_is_the_recorded_version() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["test"]
    pins = [r for r in extras if re.match(r"keras\b", r)]
    assert pins == [f"keras=={references.KERAS_VERSION}"], pins
    stored = references.stored()
    assert stored.keras == references.KERAS_VERSION, f"recorded with keras {stored.keras}: {RECORD}"


def test_installed_keras_is_the_pinned_one() -> None:
    import keras

    assert keras.__version__ == references.KERAS_VERSION


def test_references_are_recorded_by_this_code() -> None:
    stored = references.stored()
    assert stored.fingerprint == references.recording_fingerprint(), (
        f"the recording code or the Keras pin changed since the references were recorded: {RECORD}"
    )


def test_every_case_is_recorded_and_nothing_else() -> None:
    wanted = set()
    for job in references.jobs():
        wanted.add(references.input_key(*job.inputs()))
    stored = set(references.stored().index)
    assert not wanted - stored, f"{len(wanted - stored)} cases are not recorded: {RECORD}"
    assert not stored - wanted, f"{len(stored - wanted)} recorded cases are no longer run: {RECORD}"


def test_the_file_stays_small() -> None:
    assert references.PATH.stat().st_size < 512 * 1024


def _assert_identical(stored: RunResult, live: RunResult) -> None:
    assert stored.iterations == live.iterations
    for name in ("first_step", "variables"):
        a, b = getattr(stored, name), getattr(live, name)
        assert list(a) == list(b), name
        for path in a:
            assert a[path].dtype == b[path].dtype and a[path].shape == b[path].shape, path
            assert a[path].tobytes() == b[path].tobytes(), f"{name} {path}"
    assert len(stored.opt_variables) == len(live.opt_variables)
    for (name, value), (live_name, live_value) in zip(
        stored.opt_variables, live.opt_variables, strict=True
    ):
        # Keras numbers some auto-named variables per process (see test_conformance).
        if not UNSTABLE_NAME.fullmatch(live_name):
            assert name == live_name
        assert value.dtype == live_value.dtype and value.shape == live_value.shape, name
        assert value.tobytes() == live_value.tobytes(), f"slot {name}"


@pytest.mark.parametrize(
    "job", LIVE_JOBS, ids=[f"{j.case_id}-{j.shapes_key}-{j.dtype}" for j in LIVE_JOBS]
)
def test_stored_result_is_live_keras_bit_for_bit(job: references.Job) -> None:
    class_name, config, init, stream = job.inputs()
    stored = references.stored().get(references.input_key(class_name, config, init, stream))
    assert stored is not None, f"not recorded: {RECORD}"
    _assert_identical(stored, run_keras(class_name, config, init, stream))


def test_a_changed_case_is_not_found() -> None:
    """A case whose inputs differ in one gradient bit has another key (so it runs live)."""
    class_name, config, init, stream = LIVE_JOBS[0].inputs()
    key = references.input_key(class_name, config, init, stream)
    grads = next(g for g in stream[5] if isinstance(g, np.ndarray) and g.size)
    grads.reshape(-1).view(np.uint32)[0] ^= 1
    assert references.input_key(class_name, config, init, stream) != key
