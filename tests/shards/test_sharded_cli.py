"""The command line with a sharded job: `serve --shards/--shard-index` (flags, environment,
refusals), and every admin command and `paramserve worker` given a comma-separated list of
shard addresses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import Client
from paramserve.server import cli
from paramserve.server.config import ConfigError, load_config
from tests.cli.test_import_cost import run_cli
from tests.support.processes import REPO, Processes, clean_env
from tests.support.servers import LocalServers
from tests.support.shards import SPLIT_BYTES, shard_gradients, shard_initial


@pytest.fixture
def job(tmp_path: Path) -> Iterator[list[str]]:
    servers = LocalServers({})
    try:
        yield [
            servers.start(
                shards=3, shard_index=i, mode="sync", checkpoint_dir=tmp_path / f"ps-{i}"
            ).address
            for i in range(3)
        ]
    finally:
        servers.stop_all()


def test_the_shard_settings_come_from_the_environment_and_are_checked() -> None:
    config = load_config(env={"PARAMSERVE_SHARDS": "4", "PARAMSERVE_SHARD_INDEX": "3"})
    assert (config.shards, config.shard_index) == (4, 3)
    with pytest.raises(ConfigError, match=r"shard_index.*\[0, 4\)"):
        load_config(env={"PARAMSERVE_SHARDS": "4", "PARAMSERVE_SHARD_INDEX": "4"})
    with pytest.raises(ConfigError, match="shards"):
        load_config(overrides={"shards": 0})


def test_serve_refuses_an_index_outside_the_job(procs: Processes) -> None:
    code, stderr = procs.refused_server("--shards", "2", "--shard-index", "2")
    assert code == 2
    assert "shard_index" in stderr and "[0, 2)" in stderr


def test_admin_commands_take_every_shard(job: list[str], tmp_path: Path, capsys) -> None:
    address = ["--address", ",".join(job), "--timeout-s", "60"]
    with Client(job, worker_id="w", split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(shard_initial(), optim_core.Adam(0.01))
        client.step(shard_gradients(0))
    assert cli.main(["status", *address]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"]["shards"] == 3 and printed["status"]["version"] == 1
    assert [s["shard_index"] for s in printed["status"]["shard_statuses"]] == [0, 1, 2]
    embedding = next(v for v in printed["layout"]["variables"] if v["name"] == "embedding")
    assert [p[0] for p in embedding["pieces"]] == [0, 1, 2]

    assert cli.main(["snapshot", *address]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["id"].startswith("cut-") and len(cut["shard_snapshots"]) == 3
    assert cli.main(["snapshots", *address]) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)] == [cut["id"]]
    assert cli.main(["download", cut["id"], str(tmp_path / "cut"), *address]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["shards"] == 3
    with Client(job, worker_id="w") as client:
        client.pull()
        client.step(shard_gradients(1))
    assert cli.main(["restore", cut["id"], *address]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert cli.main(["upload", str(tmp_path / "cut"), "--restore", *address]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    # A plain address of one shard: its status answers, a training call does not.
    assert cli.main(["status", "--address", job[1]]) == 0
    assert json.loads(capsys.readouterr().out)["shard_index"] == 1


def test_worker_trains_a_sharded_job(job: list[str]) -> None:
    command = [
        sys.executable, "-m", "paramserve.server", "worker", "--address", ",".join(job),
        "--steps", "3", "--log-every", "1", "--timeout-s", "60",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with Client(job) as client:
        status = client.status()
        assert [s.version for s in status.shard_statuses] == [3, 3, 3]
        weights = client.pull()
    assert all(np.isfinite(w).all() for w in weights.values())


def test_top_names_each_shard(job: list[str]) -> None:
    with Client(job, worker_id="w", split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(shard_initial(), optim_core.Adam(0.01))
    proc, _ = run_cli("top", "--once", "--interval", "0.05", *job)
    assert proc.returncode == 0, proc.stderr
    for index, address in enumerate(job):
        assert f"{address} ({index}/3)" in proc.stdout
