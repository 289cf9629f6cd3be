"""`paramserve demo` runs end to end: training, snapshot, restore, identical replay."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from paramserve.server import demo


def test_demo_trains_snapshots_restores_and_replays_identically(capsys, tmp_path):
    png = tmp_path / "curves" / "demo.png"
    assert demo.main(["--steps", "12", "--workers", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "replay after restore: weights identical" in out
    assert f"loss curve: {png}" in out
    assert out.rstrip().endswith("demo passed")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_via_the_cli_with_flags(tmp_path):
    cmd = [sys.executable, "-m", "paramserve.server", "demo", "--steps", "6", "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "demo passed" in done.stdout
    # By default the curves go to the current directory.
    assert "loss curve: paramserve-demo.png" in done.stdout
    assert (tmp_path / "paramserve-demo.png").stat().st_size > 0


def test_demo_without_a_plot_writes_no_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--steps", "2", "--workers", "1", "--no-plot"]) == 0
    assert "loss curve" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_demo_rejects_bad_flags():
    with pytest.raises(SystemExit):
        demo.main(["--mode", "nope"])
    assert demo.main(["--steps", "0"]) == 2


def _accuracies(out: str) -> list[float]:
    """The full-data accuracies (percent) the demo printed after training."""
    return [
        float(m) for m in re.findall(r"version \d+: full-data loss \S+, accuracy ([\d.]+)%", out)
    ]


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
def test_demo_with_compressed_wire_reaches_the_float32_accuracy(capsys, wire_dtype):
    """Sync mode, fixed seed: gradients and weights in 16 bits with error feedback train the
    MLP to the accuracy float32 reaches, within half a point, mid-training and at the end."""
    argv = ["--steps", "30", "--workers", "2", "--no-plot", "--seed", "0"]
    assert demo.main(argv) == 0
    exact = _accuracies(capsys.readouterr().out)
    assert demo.main([*argv, "--wire-dtype", wire_dtype]) == 0
    out = capsys.readouterr().out
    compressed = _accuracies(out)
    assert f"{wire_dtype} on the wire" in out
    assert len(exact) == len(compressed) == 2
    for a, b in zip(exact, compressed, strict=True):
        assert abs(a - b) <= 0.5, (exact, compressed)
