"""bench/step.py's streamed yardstick and its peers (torch RPC, Ray) stay runnable and exact.

Each test runs the benchmark for a few steps at the ``small`` size and checks that the system
ran and that its weights after the warm-up matched the local optim_core Adam replay (the
benchmark's own check). Timing figures are never asserted. A peer whose library is missing is
skipped here, as the benchmark itself skips it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench(size: str, steps: int, systems: str, *more: str) -> str:
    """bench/step.py's output for a short run (one repeat after two warm-up steps)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "step.py"),
            "--sizes",
            size,
            "--steps",
            str(steps),
            "--repeats",
            "1",
            "--warmup",
            "2",
            "--systems",
            systems,
            "--time-limit",
            "120",
            *more,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _run_step(*systems: str) -> dict[str, Any]:
    return json.loads(_bench("small", 3, ",".join(systems), "--json"))


def _check(payload: dict[str, Any], *systems: str) -> None:
    rows = {r["system"]: r for r in payload["results"]}
    assert set(rows) == set(systems)
    assert all(r["verified"] for r in rows.values())


def test_socket_fast_matches_adam() -> None:
    """The streamed hand-written server (one piece at ``small``) and the serial one."""
    _check(_run_step("socket", "socket-fast"), "socket", "socket-fast")


def test_socket_fast_streams_many_pieces() -> None:
    """At 4M floats (16 MiB, four pieces) the streamed step still matches Adam exactly."""
    _check(json.loads(_bench("4M", 2, "socket-fast", "--json")), "socket-fast")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_rpc_matches_adam() -> None:
    _check(_run_step("torch-rpc"), "torch-rpc")


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_matches_adam() -> None:
    _check(_run_step("ray"), "ray")


def test_missing_library_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer whose library is absent is named with the reason instead of failing the run."""
    monkeypatch.syspath_prepend(str(BENCH))
    import step_systems

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert "'ray' is not installed" in (step_systems.missing_library("ray") or "")
    assert step_systems.missing_library("socket-fast") is None


def test_paramserve_bf16_matches_its_rounded_adam_replay() -> None:
    """bfloat16 on the wire, error feedback included, against the local replay of it."""
    _check(_run_step("paramserve", "paramserve-bf16"), "paramserve", "paramserve-bf16")


def test_grpc_raw_applying_whole_or_per_chunk_matches_adam() -> None:
    """grpc-raw applies Adam per 2 MiB chunk as it arrives, grpc-raw-whole once after the
    last chunk: at 1M floats (two chunks) both end bit for bit at the local Adam replay."""
    stdout = _bench("1M", 2, "paramserve,grpc-raw,grpc-raw-whole")
    lines = stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("-"))) + 1 :]
    rows = [line.split() for line in table[: next(i for i, x in enumerate(table) if x[0] == "(")]]
    assert {row[1]: row[-1] for row in rows} == {
        "paramserve": "yes",
        "grpc-raw": "yes",
        "grpc-raw-whole": "yes",
    }
    assert "paramserve / grpc-raw-whole steps/s" in stdout
