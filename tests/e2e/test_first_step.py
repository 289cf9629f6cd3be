"""The fused kernels are compiled (or loaded) before a model serves, outside the model lock.

A first push used to compile numba kernels while holding the model lock: seconds during
which GetStatus blocked and a client's deadline could pass with the push applied. Now
creating or restoring a model prepares them first, and the daemon's ``--resume`` does it
before it reports SERVING. The checks count compilations and look at the lock, never at the
clock. The cache lives in the user's cache directory, not in the installed package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paramserve.client import Client
from tests.support.processes import Processes, clean_env

pytest.importorskip("numba")

PROBE = r"""
import json, sys
import numpy as np
from paramserve.optim_core import fused
from paramserve.server.aggregator import AggregationConfig, Aggregator
from paramserve.server.store import ModelStore

store = ModelStore()
compiles = []
real = fused._compile
def spy(cache):
    compiles.append({"lock_held": store.lock._is_owned()})
    return real(cache)
fused._compile = spy

variables = {"w": np.ones((64, 8), np.float32), "b": np.zeros(8, np.float32)}
store.create_model("m", "adam", variables)
at_create = len(compiles)
aggregator = Aggregator(store, AggregationConfig(mode="async"))
grads = {"w": np.full((64, 8), 0.5, np.float32), "b": np.ones(8, np.float32)}
result = aggregator.push("w0", 1, 0, grads)
print(json.dumps({
    "compiles": compiles, "at_create": at_create, "version": result.version,
    "prepared": fused.prepared(), "cache_dir": str(fused.cache_dir()),
}))
"""


def test_kernels_are_prepared_at_create_outside_the_lock_and_cached_per_user(tmp_path: Path):
    env = {k: v for k, v in clean_env().items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["at_create"] == 1, report  # compiled (or loaded) while creating the model
    assert report["compiles"] == [{"lock_held": False}], report  # ... outside the model lock
    assert report["version"] == 1 and report["prepared"]  # the first step compiled nothing
    cache = Path(report["cache_dir"])
    assert cache == tmp_path / "cache" / "paramserve" / "numba"
    assert any(cache.rglob("*.nbi")), "no kernel cache in the user's cache directory"


def test_resume_prepares_the_kernels_before_the_server_reports_serving(tmp_path: Path):
    procs = Processes(tmp_path)
    try:
        ckpt = tmp_path / "ckpt"
        first = procs.server("--mode", "async", "--checkpoint-dir", ckpt)
        with Client(first.address, timeout_s=30) as client:
            client.create_model({"w": np.ones(4, np.float32)}, "adam")
            client.snapshot()
        assert first.terminate() == 0
        resumed = procs.server("--mode", "async", "--checkpoint-dir", ckpt, "--resume")
        messages = list(resumed.messages)
        ready = next(i for i, m in enumerate(messages) if "fused optimizer kernels" in m)
        listening = next(i for i, m in enumerate(messages) if "listening on" in m)
        assert ready < listening, messages
        with Client(resumed.address, timeout_s=30) as client:
            assert client.push({"w": np.ones(4, np.float32)}).version == 1
    finally:
        procs.cleanup()
    assert os.path.isdir(ckpt)
