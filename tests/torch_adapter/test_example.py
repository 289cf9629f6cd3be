"""examples/torch_digits.py end to end, with few steps: a daemon, two PyTorch workers in
sync mode, the final accuracy on held-out digits and the PNG."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torch_digits.py"


def test_torch_digits_example_trains_to_accuracy(tmp_path: Path) -> None:
    png = tmp_path / "plots" / "digits.png"
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workers", "2", "--steps", "60", "--plot", str(png)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "sync mode, 2 replicas" in out
    assert re.search(r"worker 1 version +25: loss [\d.]+, batch accuracy [\d.]+, lr 0.005", out)
    finals = re.findall(r"worker (\d) finished at version 60: test accuracy ([\d.]+)", out)
    assert sorted(rank for rank, _ in finals) == ["0", "1"]
    assert len({accuracy for _, accuracy in finals}) == 1  # one model: the same weights
    accuracy = float(re.search(r"final test accuracy ([\d.]+)", out).group(1))
    assert accuracy >= 0.85, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "torch_digits.png").exists()
