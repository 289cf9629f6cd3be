"""The README's Python examples run as written, each in a fresh interpreter; the tour's
worker, examples/worker.py, trains against a real sync server from two processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from paramserve.client import Client
from paramserve.server.app import create_server
from paramserve.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
WORKER = REPO / "examples" / "worker.py"
KERAS_REMOTE = next(b for b in BLOCKS if "from paramserve.client.keras import" in b)


def run_block(code: str) -> subprocess.CompletedProcess:
    """One block in a fresh interpreter; Keras blocks on JAX (the suite's numpy backend
    cannot train)."""
    env = dict(os.environ)
    if "import keras" in code:
        env["KERAS_BACKEND"] = "jax"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int) -> None:
    code = BLOCKS[index]
    if "Client(" in code or "RemoteOptimizer(" in code:
        pytest.skip("needs a running server: see the tests below")
    out = run_block(code)
    assert out.returncode == 0, out.stderr


def test_readme_keras_block_trains_against_a_server() -> None:
    """The one-line change beside plain Keras: its fit trains against a real daemon."""
    server = create_server(ServerConfig(port=0, log_level="warning", snapshot_on_exit=False))
    try:
        out = run_block(KERAS_REMOTE.replace("127.0.0.1:50051", server.address))
        assert out.returncode == 0, out.stderr
        with Client(server.address, timeout_s=10) as admin:
            steps_per_epoch = -(-1797 // 32)  # the digits set, batches of 32
            assert admin.status().version == 15 * steps_per_epoch
    finally:
        server.stop(grace_s=0)


def test_readme_worker_trains_against_a_server(tmp_path: Path) -> None:
    server = create_server(
        ServerConfig(port=0, log_level="warning", snapshot_on_exit=False).replace(
            mode="sync", replicas=2
        )
    )
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    *("--address", server.address, "--worker-id", f"worker-{rank}"),
                    *("--seed", str(rank), "--steps", "120", "--log-every", "100"),
                ],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, err
            losses = [float(line.split()[-1]) for line in out.splitlines()]
            assert len(losses) == 3 and losses[-1] < losses[0]  # steps 0, 100 and 119
        with Client(server.address, timeout_s=10) as admin:
            status = admin.status()
        assert status.version == 120 and status.rounds_completed == 120
    finally:
        server.stop(grace_s=0)
