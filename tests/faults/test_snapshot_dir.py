"""The checkpoint directory against real daemons: which model ``--resume`` brings back, what a
refused restore leaves behind, one daemon per directory, and the mode of every file.

The hazards of issue 7: a refused ``upload_snapshot(..., restore=True)`` of another model's
snapshot used to keep the file, and ``--resume`` after ``kill -9`` then came back with that
other model; uploaded snapshots were stored 0644 while the daemon's own are 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from paramserve.client import Client, FailedPreconditionError, SnapshotInfo
from paramserve.server.aggregator import AggregationConfig, Aggregator
from paramserve.server.snapshots import SnapshotState, SnapshotStore
from paramserve.server.store import ModelStore
from tests.support.models.dense import ADAM, SHAPES, gradients, initial_weights
from tests.support.processes import Processes, ServerProcess

RECORD = "serving-model.json"
LOCK = ".paramserve.lock"
FLAGS = ("--mode", "async", "--no-snapshot-on-exit")


def other_model_snapshot(path: Path) -> Path:
    """A valid snapshot file, made now, of another model: 'other', embedding float32[4, 4]."""
    store = ModelStore()
    store.create_model("other", ADAM, {"embedding": np.ones((4, 4), np.float32)})
    aggregator = Aggregator(store, AggregationConfig(mode="async"))
    with store.lock:
        state = SnapshotState(store.export_state(), aggregator.export_state())
    info = SnapshotStore(path.parent / f"{path.stem}-made").save(state)
    shutil.copy(info.path, path)
    return path


def listing(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file of a directory: name -> (sha256, mode bits); the lock file (which names the
    daemon holding it) by its mode only."""
    return {
        p.name: (
            "" if p.name == LOCK else hashlib.sha256(p.read_bytes()).hexdigest(),
            stat.S_IMODE(p.stat().st_mode),
        )
        for p in sorted(directory.iterdir())
    }


def variable_names(client: Client) -> list[str]:
    return client.describe().variable_names


@dataclass
class Served:
    procs: Processes
    server: ServerProcess
    ckpt: Path
    snap: SnapshotInfo  # of the served model, version 3
    other: Path  # a snapshot file of another model, newer than ``snap``

    def client(self, server: ServerProcess | None = None) -> Client:
        return Client((server or self.server).address, worker_id="worker-0", timeout_s=30.0)

    def restart(self, *flags: str) -> ServerProcess:
        """kill -9 the daemon and start another on the same port and directory."""
        self.server.kill()
        self.server = self.procs.server(
            "--port", str(self.server.port), "--checkpoint-dir", self.ckpt, *FLAGS, *flags
        )  # fmt: skip
        return self.server


@pytest.fixture
def served(procs: Processes, tmp_path: Path) -> Iterator[Served]:
    """A daemon serving the fault tests' model, with a snapshot at version 3."""
    ckpt = tmp_path / "ckpt"
    server = procs.server("--checkpoint-dir", ckpt, *FLAGS)
    with Client(server.address, worker_id="worker-0", timeout_s=30.0) as client:
        client.create_model(initial_weights(), ADAM)
        for sequence in (1, 2, 3):
            client.push(gradients("worker-0", sequence), sequence=sequence)
        snap = client.snapshot()
    other = other_model_snapshot(tmp_path / "other.safetensors")
    yield Served(procs, server, ckpt, snap, other)


def test_a_refused_restore_of_an_upload_leaves_the_directory_as_it_was(served: Served):
    before = listing(served.ckpt)
    with served.client() as client:
        with pytest.raises(FailedPreconditionError) as err:
            client.upload_snapshot(served.other, restore=True)
        message = str(err.value)
        assert "different model definition" in message and "'other'" in message, message
        assert listing(served.ckpt) == before  # the uploaded file is gone, nothing else moved
        assert [s.id for s in client.list_snapshots()] == [served.snap.id]
        assert variable_names(client) == list(SHAPES) and client.status().version == 3

        # Stored on purpose (no restore), then the same file with restore: refused, but the
        # identical snapshot that was there before the upload stays.
        stored = client.upload_snapshot(served.other)
        kept = listing(served.ckpt)
        with pytest.raises(FailedPreconditionError):
            client.upload_snapshot(served.other, restore=True)
        assert listing(served.ckpt) == kept
        assert [s.id for s in client.list_snapshots()] == [served.snap.id, stored.id]


def test_resume_skips_snapshots_of_another_model(served: Served):
    with served.client() as client:
        stored = client.upload_snapshot(served.other)  # newer than the served model's snapshot
    server = served.restart("--resume")
    server.wait_for_message(
        rf"skipping snapshot {stored.id}: it holds model 'other' .*embedding float32\[4, 4\].*"
        r"serves model 'model' .*dense/kernel float32\[16, 8\]",
        30,
    )
    server.wait_for_message(rf"resumed from snapshot {served.snap.id} at version 3", 30)
    with served.client() as client:
        assert variable_names(client) == list(SHAPES) and client.status().version == 3
    assert (served.ckpt / f"{stored.id}.safetensors").exists()  # skipped, never deleted


def test_resume_refuses_to_switch_to_another_model(procs: Processes, tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    server = procs.server("--checkpoint-dir", ckpt, *FLAGS)
    with Client(server.address, timeout_s=30.0) as client:
        client.create_model(initial_weights(), ADAM)  # killed before its first snapshot
        stored = client.upload_snapshot(other_model_snapshot(tmp_path / "other.safetensors"))
    server.kill()
    before = listing(ckpt)
    code, stderr = procs.refused_server("--checkpoint-dir", ckpt, *FLAGS, "--resume")
    assert code == 1, stderr
    # The message names both models, the record, and what to do.
    for needle in (
        f"{ckpt}",
        "model 'model' with variables ['dense/kernel float32[16, 8]', 'dense/bias float32[8]']",
        "model 'other' with variables ['embedding float32[4, 4]']",
        stored.id,
        RECORD,
        "without --resume",
    ):
        assert needle in stderr, (needle, stderr)
    assert listing(ckpt) == before


def test_resume_follows_deliberate_model_changes(served: Served):
    with served.client() as client:
        client.delete_model()
    server = served.restart("--resume")  # killed with no model: it comes back with none
    server.wait_for_message(r"the model was deleted", 30)
    with served.client() as client:
        assert not client.status().has_model
        # The deleted model's snapshots stay; loading another model is a deliberate change.
        restored = client.upload_snapshot(served.other, restore=True)
        assert variable_names(client) == ["embedding"]
    server = served.restart("--resume")
    server.wait_for_message(rf"resumed from snapshot {restored.id} at version 0", 30)
    with served.client() as client:
        assert variable_names(client) == ["embedding"]
        # And back: delete, restore the first model by id; resume follows again.
        client.delete_model()
        client.restore(served.snap.id)
    server = served.restart("--resume")
    server.wait_for_message(rf"resumed from snapshot {served.snap.id} at version 3", 30)
    record = json.loads((served.ckpt / RECORD).read_text())
    assert record["model"]["name"] == "model"
    assert [v["name"] for v in record["model"]["variables"]] == list(SHAPES)


def test_a_second_daemon_on_the_same_directory_refuses_to_start(served: Served):
    fresh = served.ckpt / ".tmp-upload-in-progress.safetensors"  # maybe the first daemon's
    fresh.write_bytes(b"partial upload")
    code, stderr = served.procs.refused_server("--checkpoint-dir", served.ckpt, *FLAGS)
    assert code == 1, stderr
    assert f"checkpoint directory {served.ckpt} is in use by another paramserve daemon" in stderr
    assert f"pid {served.server.proc.pid}" in stderr, stderr
    assert fresh.exists()  # the refused daemon removed nothing
    with served.client() as client:  # the first one carries on
        assert client.status().version == 3
        assert client.snapshot().version == 3
    # Once the first one has stopped, the directory is free again.
    assert served.server.terminate() == 0
    server = served.procs.server("--checkpoint-dir", served.ckpt, *FLAGS, "--resume")
    server.wait_for_message(r"resumed from snapshot snap-000000000003-\S+ at version 3", 30)
    assert not fresh.exists()  # leftovers go at start-up


def test_uploaded_snapshots_the_daemons_own_and_the_record_are_0600(
    procs: Processes, tmp_path: Path
):
    ckpt = tmp_path / "ckpt"
    umask = os.umask(0o022)  # a usual umask, under which a plain open() gives 0644
    try:
        server = procs.server("--checkpoint-dir", ckpt, *FLAGS)
    finally:
        os.umask(umask)
    with Client(server.address, timeout_s=30.0) as client:
        client.create_model(initial_weights(), ADAM)
        own = client.snapshot()
        uploaded = client.upload_snapshot(other_model_snapshot(tmp_path / "other.safetensors"))
    modes = {name: mode for name, (_, mode) in listing(ckpt).items()}
    assert modes[f"{uploaded.id}.safetensors"] == 0o600, oct(modes[f"{uploaded.id}.safetensors"])
    assert modes[f"{own.id}.safetensors"] == 0o600
    assert modes[RECORD] == 0o600
    assert set(modes.values()) == {0o600}, {n: oct(m) for n, m in modes.items()}
