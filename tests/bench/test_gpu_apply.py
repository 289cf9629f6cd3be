"""bench/gpu_apply.py: without a usable GPU it says so and exits 0 (with one, the GPU check
script runs it for real; bench/gpu_check.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paramserve import optim_core

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.skipif(optim_core.gpu_available(), reason="a GPU is here: gpu_check.sh measures")
def test_without_a_gpu_it_says_so() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_apply.py"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no usable GPU" in json.loads(proc.stdout)["skipped"]


@pytest.mark.gpu
@pytest.mark.skipif(not optim_core.gpu_available(), reason="no usable GPU (CuPy)")
def test_on_a_gpu_every_case_is_measured() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_apply.py"), "--json", "--sizes", "1M", "--repeat", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = json.loads(proc.stdout)["rows"]
    assert [r["name"] for r in rows][:2] == ["copy (d2d)", "Adam"]
    assert all(r["gbytes_per_s"] > 0 for r in rows)
    # Every optimizer row takes the fused path, but the xp-rule rows kept for comparison.
    for r in rows[1:]:
        assert (r["fused"] == 0) == ("(xp" in r["name"]), r
