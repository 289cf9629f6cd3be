"""bench/shards_model.py: the on-paper model of S shards x W workers follows its formulas.

Pure arithmetic on given costs (no timing): each bound scales with what it should, the
least one is reported, and the costs are read back from a bench/shards.py JSON file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import shards_model  # noqa: E402

COSTS = shards_model.Costs(shard_s_per_gb=0.5, worker_s_per_gb=0.25)
N = 1 << 28  # 1 GiB-ish of float32 each way: 1.073741824 GB


def test_each_bound_follows_its_formula() -> None:
    gb = 4 * N / 1e9
    b = shards_model.model(COSTS, elements=N, shards=4, workers=8, link_gbit=100)
    assert b.bounds["shard CPU"] == pytest.approx(4 / (2 * gb * 0.5))
    assert b.bounds["worker CPU"] == pytest.approx(8 / (2 * gb * 0.25))
    assert b.bounds["shard NIC"] == pytest.approx(4 * 12.5 / gb)
    assert b.bounds["worker NIC"] == pytest.approx(8 * 12.5 / gb)
    assert b.limit == "shard CPU" and b.steps_per_s == b.bounds["shard CPU"]


def test_the_bottleneck_moves() -> None:
    # Few shards: shard CPU; enough shards for the workers: worker CPU.
    few = shards_model.model(COSTS, elements=N, shards=1, workers=8, link_gbit=25)
    many = shards_model.model(COSTS, elements=N, shards=64, workers=8, link_gbit=25)
    assert few.limit == "shard CPU" and many.limit == "worker CPU"
    # Many shard processes on one host share its link: the NIC binds.
    packed = shards_model.model(
        COSTS, elements=N, shards=16, workers=64, link_gbit=25, shards_per_host=16
    )
    assert packed.limit == "shard NIC"
    # Where a shard process fills the link on its own: 1 / (2 * 0.5) GB/s each way = 8 Gbit/s.
    assert shards_model.nic_bound_hosts(COSTS, 25) == pytest.approx(25 / 8)


def test_costs_from_a_shards_json(tmp_path: Path) -> None:
    rows = [
        {"shards": 1, "server_cpu_s_per_gb": 9.0, "worker_cpu_s_per_gb": 9.0},
        {"shards": 2, "server_cpu_s_per_gb": 0.6, "worker_cpu_s_per_gb": 0.4},
        {"shards": 4, "server_cpu_s_per_gb": 0.8, "worker_cpu_s_per_gb": 0.5},
    ]
    path = tmp_path / "shards.json"
    path.write_text(json.dumps({"results": rows}))
    costs = shards_model.costs_from_figures(path, 1.0, 2.0)
    assert costs == shards_model.Costs(0.7, 0.45, 1.0, 2.0)  # medians of the S > 1 rows
    out = subprocess.run(
        [sys.executable, str(BENCH / "shards_model.py"), "--figures", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "c_s 0.700" in out and "c_w 0.450" in out
    assert len([line for line in out.splitlines() if " st/s " in line]) == 15
