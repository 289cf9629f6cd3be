"""`paramserve demo` runs end to end: training, snapshot, restore, identical replay."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paramserve.server import demo


def test_demo_trains_snapshots_restores_and_replays_identically(capsys):
    assert demo.main(["--steps", "12", "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "replay after restore: weights identical" in out
    assert out.rstrip().endswith("demo passed")


def test_demo_via_the_cli_with_flags():
    cmd = [sys.executable, "-m", "paramserve.server", "demo", "--steps", "6", "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "demo passed" in done.stdout


def test_demo_rejects_bad_flags():
    with pytest.raises(SystemExit):
        demo.main(["--mode", "nope"])
    assert demo.main(["--steps", "0"]) == 2
