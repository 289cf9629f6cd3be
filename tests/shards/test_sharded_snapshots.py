"""Snapshots of a sharded job: one cut on every shard, restored all together or not at all,
downloaded as a directory with a manifest, uploaded to another job, resumed after a crash."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from paramserve.server import cli
from tests.support.processes import Processes
from tests.support.servers import LocalServers
from tests.support.shards import SPLIT_BYTES, shard_gradients, shard_initial


@pytest.fixture
def servers() -> Iterator[LocalServers]:
    started = LocalServers({})
    try:
        yield started
    finally:
        started.stop_all()


def _job(servers: LocalServers, root: Path, name: str, shards: int = 3, **settings) -> list[str]:
    return [
        servers.start(
            shards=shards, shard_index=i, checkpoint_dir=root / f"{name}-{i}", **settings
        ).address
        for i in range(shards)
    ]


def _train(client: Client, seeds: range) -> None:
    for seed in seeds:
        client.step(shard_gradients(seed))


def _state(client: Client) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    weights = client.pull()
    return weights.version, dict(weights), dict(client.optimizer_state())


def _assert_same(a, b) -> None:
    assert a[0] == b[0]
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        assert sorted(x) == sorted(y)
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name, strict=True)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cut_restores_every_shard_to_one_version(
    servers: LocalServers, tmp_path: Path, mode: str
) -> None:
    addresses = _job(servers, tmp_path, "job", mode=mode)
    with Client(addresses, worker_id="w", split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(shard_initial(), optim_core.Adam(0.01))
        _train(client, range(3))
        at_cut = _state(client)
        cut = client.snapshot()
        assert cut.version == 3 and len(cut.shard_snapshots) == 3
        assert [s.version for s in cut.shard_snapshots] == [3, 3, 3]
        assert all(s.cut_id == cut.id for s in cut.shard_snapshots)
        _train(client, range(3, 5))
        assert [c.id for c in client.list_snapshots()] == [cut.id]
        restored = client.restore(cut.id)
        assert restored.version == 3
        _assert_same(at_cut, _state(client))
        assert [s.version for s in client.status().shard_statuses] == [3, 3, 3]


def test_a_cut_missing_on_one_shard_is_not_offered(servers: LocalServers, tmp_path: Path) -> None:
    addresses = _job(servers, tmp_path, "job", mode="sync")
    with Client(addresses, worker_id="w", split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(shard_initial(), optim_core.SGD(0.1))
        cut = client.snapshot()
        (tmp_path / "job-2" / f"{cut.shard_snapshots[2].id}.safetensors").unlink()
        assert client.list_snapshots() == []
        with pytest.raises(NotFoundError, match="every shard"):
            client.restore(cut.id)


def test_a_damaged_part_restores_no_shard(servers: LocalServers, tmp_path: Path) -> None:
    addresses = _job(servers, tmp_path, "job", mode="sync")
    with Client(addresses, worker_id="w", split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(shard_initial(), optim_core.Adam(0.01))
        _train(client, range(2))
        cut = client.snapshot()
        _train(client, range(2, 4))
        before = _state(client)
        damaged = tmp_path / "job-1" / f"{cut.shard_snapshots[1].id}.safetensors"
        data = bytearray(damaged.read_bytes())
        data[-5] ^= 0xFF  # a flipped bit in the last tensor's bytes
        damaged.write_bytes(bytes(data))
        with pytest.raises(InvalidArgumentError, match="sha256"):
            client.restore(cut.id)
        _assert_same(before, _state(client))


def test_download_and_upload_to_another_job(servers: LocalServers, tmp_path: Path) -> None:
    first = _job(servers, tmp_path, "first", mode="sync")
    second = _job(servers, tmp_path, "second", mode="sync")
    smaller = _job(servers, tmp_path, "small", shards=2, mode="sync")
    out = tmp_path / "download"
    with Client(first, worker_id="w", split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(shard_initial(), optim_core.Adam(0.01))
        _train(client, range(3))
        cut = client.snapshot()
        expected = _state(client)
        client.download_snapshot(cut, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == 3 and manifest["version"] == 3
    assert manifest["layout"]["variables"][0]["name"] == "embedding"
    assert len(manifest["layout"]["variables"][0]["pieces"]) == 3  # split by rows
    with Client(second, worker_id="w") as client:
        info = client.upload_snapshot(out, restore=True)
        assert info.version == 3
        _assert_same(expected, _state(client))
        # Training goes on from the cut exactly as the first job would have.
    with Client(smaller, worker_id="w") as client:  # 3 shards' cut into 2: re-sharded
        info = client.upload_snapshot(out, restore=True)
        assert info.version == 3 and info.cut_id != manifest["cut_id"]
        _assert_same(expected, _state(client))
    (out / "shard-1.safetensors").write_bytes(b"not a snapshot")
    with Client(second, worker_id="w") as client, pytest.raises(ValueError, match="sha256"):
        client.upload_snapshot(out)


def test_a_killed_shard_resumes_and_the_job_rolls_back_to_the_cut(
    procs: Processes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def start(index: int, *extra: str):
        return procs.server(
            "--shards", "3", "--shard-index", str(index), "--mode", "sync",
            "--checkpoint-dir", str(tmp_path / f"ps-{index}"), *extra,
        )  # fmt: skip

    shards = [start(i) for i in range(3)]
    addresses = [s.address for s in shards]
    with Client(addresses, worker_id="w", timeout_s=60, split_threshold_bytes=SPLIT_BYTES) as c:
        c.create_model(shard_initial(), optim_core.Adam(0.01))
        _train(c, range(2))
        cut = c.snapshot()
        at_cut = _state(c)
        _train(c, range(2, 5))
    shards[1].proc.send_signal(signal.SIGKILL)
    shards[1].proc.wait(timeout=30)
    shards[1] = start(1, "--port", str(shards[1].port), "--resume")
    with Client(addresses, worker_id="w", timeout_s=60) as client:
        versions = [s.version for s in client.status().shard_statuses]
        assert versions == [5, 2, 5]  # shard 1 resumed the cut; the others ran on
        with pytest.raises(FailedPreconditionError, match=f"paramserve restore {cut.id}"):
            client.pull()
        # The documented way back: the newest cut every shard holds, on all of them.
        assert cli.main(["restore", "latest", "--address", ",".join(addresses)]) == 0
        assert json.loads(capsys.readouterr().out)["id"] == cut.id
        _assert_same(at_cut, _state(client))
        _train(client, range(2, 5))
        assert [s.version for s in client.status().shard_statuses] == [5, 5, 5]
