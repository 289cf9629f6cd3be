"""examples/keras_digits.py runs (2 workers, 3 epochs, a daemon it starts) and learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .daemon import REPO, clean_env

MIN_ACCURACY = 0.85  # 3 epochs reach about 0.95 on the 450 held-out digits


def test_keras_digits_example_trains_two_workers_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "digits.png"
    arguments = ["--workers", "2", "--epochs", "3", "--plot", str(plot)]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "keras_digits.py"),
            *arguments,
            f"--min-accuracy={MIN_ACCURACY}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(KERAS_BACKEND="jax"),
        cwd=tmp_path,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for rank in range(2):
        assert f"[worker {rank}] epoch  3/3" in proc.stdout
    final = re.search(r"final: server version (\d+), test accuracy ([\d.]+)", proc.stdout)
    assert final is not None, output[-3000:]
    # 1347 training images, 2 shards of 21 batches of 32: one version per sync round.
    assert int(final.group(1)) == 3 * 21
    assert float(final.group(2)) >= MIN_ACCURACY
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
