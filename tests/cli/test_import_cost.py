"""The admin path stays light: ``paramserve --help`` and the admin commands, run against a
real server, import none of the daemon's heavy modules (judged by the modules imported, as
``python -X importtime`` lists them, never by the clock)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.models.tiny import grads_for
from tests.support.processes import clean_env

# Top-level packages, and modules of ours, that the admin path must not import.
HEAVY = (
    "ml_dtypes",
    "numba",
    "llvmlite",
    "prometheus_client",
    "keras",
    "torch",
    "jax",
    "tensorflow",
    "cupy",
    "safetensors",
    "tqdm",
    "paramserve.optim_core",
    "paramserve.server.core",
    "paramserve.server.app",
    "paramserve.server.config",
    "paramserve.server.store",
    "paramserve.server.snapshots",
    "paramserve.server.metrics",
    "paramserve.server.demo",
    "paramserve.client.remote",
)


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``python -X importtime -m paramserve.server ARGS``: the finished process and the
    modules it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "paramserve.server", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    modules = set()
    other = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[1].strip())
        else:
            other.append(line)
    proc.stderr = "\n".join(other)
    assert "paramserve.server.cli" in modules  # the listing works
    return proc, modules


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_help_imports_nothing_heavy() -> None:
    proc, modules = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "status" in proc.stdout
    assert heavy_in(modules) == []


def test_snapshot_help_imports_nothing_heavy() -> None:
    """``snapshot reshard`` imports the snapshot code when it runs, not for its help."""
    for argv in (["snapshot", "--help"], ["snapshot", "reshard", "--help"]):
        proc, modules = run_cli(*argv)
        assert proc.returncode == 0, proc.stderr
        assert "reshard" in proc.stdout
        assert heavy_in(modules) == []


def test_admin_commands_against_a_server_import_nothing_heavy(start_server, tmp_path) -> None:
    server = start_server(checkpoint_dir=tmp_path / "ckpt")
    server.create()
    server.push(grads_for())
    address = ["--address", server.address, "--timeout-s", "60"]

    proc, modules = run_cli("status", *address)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == 1
    assert heavy_in(modules) == []

    proc, modules = run_cli("snapshot", *address)
    assert proc.returncode == 0, proc.stderr
    snapshot = json.loads(proc.stdout)
    assert heavy_in(modules) == []

    proc, modules = run_cli("snapshots", *address)
    assert proc.returncode == 0, proc.stderr
    assert [s["id"] for s in json.loads(proc.stdout)] == [snapshot["id"]]
    assert heavy_in(modules) == []

    proc, modules = run_cli("restore", snapshot["id"], *address)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["id"] == snapshot["id"]
    assert heavy_in(modules) == []


def test_an_unreachable_server_imports_nothing_heavy_either(tmp_path) -> None:
    from tests.support.processes import free_port

    proc, modules = run_cli("status", "--address", f"127.0.0.1:{free_port()}", "--timeout-s", "5")
    assert proc.returncode == 1
    assert heavy_in(modules) == []


def test_serve_still_imports_the_daemon() -> None:
    """The check is not vacuous: ``serve --help`` needs the daemon's settings (optim_core)."""
    proc, modules = run_cli("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "paramserve.optim_core" in heavy_in(modules)
