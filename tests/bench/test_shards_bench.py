"""bench/shards.py stays runnable and exact in a tiny configuration.

One run: 16K floats, S = 1 and 2 shards, W = 1 and 2 workers, sync mode, two timed steps per
worker. Checks the JSON figures' structure (a socket-fast row, one row per configuration, the
ratios that follow from them) and that every configuration passed the benchmark's own check
(weights and versions against a local Adam replay), and that the printed table has its rows.
Timing figures are never asserted: the machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_tiny_sharded_run(tmp_path: Path) -> None:
    out = tmp_path / "shards.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "shards.py"),
            "--sizes",
            "16K",
            "--shards",
            "1,2",
            "--workers",
            "1,2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--time-limit",
            "150",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    payload = json.loads(out.read_text())

    fast = payload["socket_fast"]
    assert [f["size"] for f in fast] == ["16K"]
    assert fast[0]["verified"] and fast[0]["steps_per_s"] > 0
    assert len(fast[0]["repeats"]) == 2  # before and after the sharded jobs

    rows = payload["results"]
    assert sorted((r["shards"], r["workers"]) for r in rows) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in rows:
        assert r["size"] == "16K" and r["elements"] == 16 << 10 and r["mode"] == "sync"
        assert r["verified"] and r["checks"] == [], r["checks"]
        assert r["agg_steps_per_s"] > 0 and r["worker_steps_per_s"] > 0
        assert len(r["server_cores"]) == r["shards"]
        assert len(r["repeats"]) == 1
        assert len(r["repeats"][0]["worker_steps_per_s"]) == r["workers"]
        assert r["ratio_vs_fast"] is not None
        assert r["gbytes_per_s"] * 1e9 == _approx(2 * 4 * r["elements"] * r["agg_steps_per_s"])
        assert r["efficiency"] == _approx(r["scaling"] / r["shards"])
        if r["shards"] == 1:
            assert r["scaling"] == 1.0

    table = proc.stdout.splitlines()
    assert table[0].split()[:4] == ["size", "mode", "S", "W"]
    assert sum(1 for line in table if line.split()[:2] == ["16K", "sync"]) == 4
    assert any(line.split()[:2] == ["16K", "socket-fast"] for line in table)


def _approx(x: float) -> object:
    import pytest

    return pytest.approx(x, rel=1e-9)
