"""The checkpoint directory: its lock, the record of the served model, the rules of
``--resume``, private temporary names, file modes, and uploads whose restore is refused."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from paramserve.server import snapshots as snapshots_module
from paramserve.server.aggregator import AggregationConfig, Aggregator
from paramserve.server.checkpoint_dir import (
    LOCK_NAME,
    RECORD_NAME,
    CheckpointDirError,
    ModelIdentity,
    ServingRecord,
    write_record,
)
from paramserve.server.config import ServerConfig
from paramserve.server.core import ServerCore
from paramserve.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    StartupRefused,
    Unavailable,
)
from paramserve.server.metrics import ServerMetrics
from paramserve.server.snapshots import SnapshotState, SnapshotStore
from paramserve.server.store import Limits, ModelStore

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
FIRST = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
OTHER = {"embedding": np.ones((4, 4), np.float32)}


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def snapshot_bytes(tmp_path: Path, name: str, variables: dict, steps: int = 0) -> bytes:
    """The bytes of a valid snapshot of model ``name`` after ``steps`` SGD-like pushes."""
    store = ModelStore()
    store.create_model(name, ADAM, variables)
    agg = Aggregator(store, AggregationConfig(mode="async"))
    for seq in range(1, steps + 1):
        agg.push("w", seq, 0, {k: np.full_like(v, 0.1) for k, v in variables.items()})
    with store.lock:
        state = SnapshotState(store.export_state(), agg.export_state())
    info = SnapshotStore(tmp_path / f"made-{name}-{steps}").save(state)
    return info.path.read_bytes()


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 4096] for i in range(0, len(data), 4096)]


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ServerCore]:
    """A daemon's core (no gRPC) on ``tmp_path / "ckpt"``, serving model "first"."""
    snapshots = SnapshotStore(tmp_path / "ckpt", keep_last=2, exclusive=True)
    store = ModelStore()
    core = ServerCore(
        store=store,
        aggregator=Aggregator(store, AggregationConfig(mode="async")),
        snapshots=snapshots,
        config=ServerConfig(),
        metrics=ServerMetrics(),
    )
    store.create_model("first", ADAM, FIRST)
    try:
        yield core
    finally:
        core.aggregator.close()
        snapshots.close()


# --- the lock ---------------------------------------------------------------------------
def test_one_exclusive_store_per_directory(tmp_path: Path) -> None:
    first = SnapshotStore(tmp_path, exclusive=True)
    with pytest.raises(StartupRefused) as err:
        SnapshotStore(tmp_path, exclusive=True)
    message = str(err.value)
    assert f"checkpoint directory {tmp_path} is in use by another paramserve daemon" in message
    assert f"pid {os.getpid()} on host " in message and "own --checkpoint-dir" in message
    SnapshotStore(tmp_path)  # tools and tests that do not lock are not refused
    first.close()
    first.close()  # twice is fine
    second = SnapshotStore(tmp_path, exclusive=True)  # released: free again
    second.close()
    assert modes(tmp_path) == {LOCK_NAME: 0o600}


# --- temporary names and modes ----------------------------------------------------------
def test_save_keeps_the_librarys_temp_file_in_a_private_folder(tmp_path, monkeypatch) -> None:
    state = snaps_load(tmp_path, snapshot_bytes(tmp_path, "first", FIRST))
    ckpt = tmp_path / "ckpt"
    snaps = SnapshotStore(ckpt)
    seen: list[list[str]] = []
    real_save_file = safetensors.numpy.save_file

    def save_file(tensors, path, metadata=None):
        # safetensors writes its own temporary file next to ``path``, then renames it.
        assert Path(path).parent.parent == ckpt, path  # so ``path`` is in a sub-folder
        real_save_file(tensors, path, metadata=metadata)
        seen.append(sorted(p.name for p in ckpt.iterdir()))

    monkeypatch.setattr(snapshots_module.safetensors.numpy, "save_file", save_file)
    umask = os.umask(0o022)
    try:
        saved = snaps.save(state)
    finally:
        os.umask(umask)
    (during,) = seen
    assert len(during) == 1 and during[0].startswith(".tmp-snap-000000000000-"), during
    assert modes(ckpt) == {saved.path.name: 0o600}  # the private folder is gone


def snaps_load(directory: Path, data: bytes) -> SnapshotState:
    store = SnapshotStore(directory / "load")
    info = store.import_file(chunks(data), size_bytes=len(data))
    return store.load(info.id)


def test_uploads_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    data = snapshot_bytes(tmp_path, "first", FIRST)
    snaps = SnapshotStore(tmp_path / "ckpt")
    umask = os.umask(0o002)
    try:
        info = snaps.import_file(chunks(data), size_bytes=len(data))
    finally:
        os.umask(umask)
    assert modes(tmp_path / "ckpt") == {info.path.name: 0o600}


def test_a_failed_save_leaves_no_temporary_folder(tmp_path, monkeypatch) -> None:
    snaps = SnapshotStore(tmp_path / "ckpt")
    state = snaps_load(tmp_path, snapshot_bytes(tmp_path, "first", FIRST))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(snapshots_module.safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        snaps.save(state)
    assert list((tmp_path / "ckpt").iterdir()) == []


# --- the record -------------------------------------------------------------------------
def test_the_record_follows_every_change_of_the_model(core: ServerCore, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    record = json.loads((ckpt / RECORD_NAME).read_text())
    assert record["format"] == "paramserve.serving_model" and record["format_version"] == 1
    assert record["reason"] == "created"
    assert record["model"] == {
        "name": "first",
        "variables": [
            {"name": "w", "dtype": "float32", "shape": [3, 2]},
            {"name": "b", "dtype": "float32", "shape": [2]},
        ],
    }
    assert modes(ckpt)[RECORD_NAME] == 0o600
    # An idempotent create, a snapshot and a restore of the same model change nothing.
    before = (ckpt / RECORD_NAME).read_bytes()
    assert not core.store.create_model("first", ADAM, FIRST).created
    info = core.take_snapshot(trigger="rpc")
    core.restore_snapshot(info.id)
    assert (ckpt / RECORD_NAME).read_bytes() == before
    core.store.delete_model()
    assert json.loads((ckpt / RECORD_NAME).read_text())["model"] is None
    data = snapshot_bytes(tmp_path, "other", OTHER)
    core.upload_snapshot(chunks(data), size_bytes=len(data), restore=False)
    assert json.loads((ckpt / RECORD_NAME).read_text())["model"] is None  # stored only
    core.upload_snapshot(chunks(data), size_bytes=len(data), restore=True)
    record = json.loads((ckpt / RECORD_NAME).read_text())
    assert record["model"]["name"] == "other" and record["reason"] == "restored"
    # A missing record (a directory of an older version) is written with the next snapshot.
    (ckpt / RECORD_NAME).unlink()
    core.take_snapshot(trigger="rpc")
    assert json.loads((ckpt / RECORD_NAME).read_text())["reason"] == "snapshot"
    assert set(modes(ckpt).values()) == {0o600}


def test_a_model_change_that_cannot_be_recorded_is_not_made(core, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("paramserve.server.checkpoint_dir.write_record", read_only)
    with pytest.raises(CheckpointDirError) as err:
        core.store.delete_model()
    assert "serving-model.json" in str(err.value) and "nothing was changed" in str(err.value)
    assert err.value.code == "INTERNAL"
    assert core.store.has_model and core.store.model_name == "first"


# --- uploads whose restore is refused ---------------------------------------------------
@pytest.mark.parametrize("refusal", ["other model", "over the limits", "shutting down"])
def test_a_refused_restore_of_an_upload_leaves_the_directory_as_it_was(core, tmp_path, refusal):
    ckpt = tmp_path / "ckpt"
    for _ in range(2):  # keep_last=2: an upload counted by retention would delete one
        core.take_snapshot(trigger="rpc")
    before = contents(ckpt)
    if refusal == "other model":
        data, error, needle = (
            snapshot_bytes(tmp_path, "other", OTHER),
            FailedPrecondition,
            "'other'",
        )
    elif refusal == "over the limits":
        core.store.limits = Limits(max_state_bytes=64)  # the store refuses the restored state
        data, error, needle = (
            snapshot_bytes(tmp_path, "first", FIRST, 3),
            ResourceExhausted,
            "max_state_bytes",
        )
    else:
        core.accepting.clear()
        data, error, needle = snapshot_bytes(tmp_path, "first", FIRST, 3), Unavailable, "neither"
    with pytest.raises(error) as err:
        core.upload_snapshot(chunks(data), size_bytes=len(data), restore=True)
    assert needle in str(err.value)
    assert contents(ckpt) == before
    assert core.store.model_name == "first" and core.store.version == 0


def test_a_refused_restore_keeps_an_identical_snapshot_that_was_there(core, tmp_path) -> None:
    data = snapshot_bytes(tmp_path, "other", OTHER)
    stored, restored = core.upload_snapshot(chunks(data), size_bytes=len(data), restore=False)
    assert not restored
    before = contents(tmp_path / "ckpt")
    with pytest.raises(FailedPrecondition):
        core.upload_snapshot(chunks(data), size_bytes=len(data), restore=True)
    assert contents(tmp_path / "ckpt") == before and stored.path.exists()


def test_retention_counts_an_upload_only_once_its_restore_succeeded(core, tmp_path) -> None:
    first, second = (core.take_snapshot(trigger="rpc") for _ in range(2))
    data = snapshot_bytes(tmp_path, "first", FIRST, 3)
    info, restored = core.upload_snapshot(chunks(data), size_bytes=len(data), restore=True)
    assert restored and core.store.version == 3
    assert [s.id for s in core.snapshots.list()] == [second.id, info.id]
    assert not first.path.exists()


def test_uploads_of_another_model_never_push_the_served_models_snapshots_out(core, tmp_path):
    """Retention counts per model (keep_last=2 here): snapshots of the served model stay."""
    served = [core.take_snapshot(trigger="rpc") for _ in range(2)]
    others = []
    for steps in range(3):
        data = snapshot_bytes(tmp_path, "other", OTHER, steps)
        info, restored = core.upload_snapshot(chunks(data), size_bytes=len(data), restore=False)
        assert not restored
        others.append(info)
    assert all(s.path.exists() for s in served)
    assert [i.path.exists() for i in others] == [False, True, True]  # 2 of the other model
    third = core.take_snapshot(trigger="rpc")
    assert [s.path.exists() for s in [*served, third]] == [False, True, True]
    assert all(i.path.exists() for i in others[1:])


# --- what --resume picks ----------------------------------------------------------------
def store_with(tmp_path: Path, *files: bytes) -> SnapshotStore:
    snaps = SnapshotStore(tmp_path / "ckpt")
    for data in files:
        snaps.import_file(chunks(data), size_bytes=len(data))
    return snaps


def record(snaps: SnapshotStore, name: str | None, variables: dict | None = None) -> None:
    identity = None
    if name is not None:
        assert variables is not None
        identity = ModelIdentity(
            name, tuple((n, a.dtype.name, a.shape) for n, a in variables.items())
        )
    write_record(snaps.directory, ServingRecord(identity, "2026-01-01T00:00:00Z", "created"))


def test_resume_takes_the_newest_snapshot_of_the_served_model(tmp_path, caplog) -> None:
    served = snapshot_bytes(tmp_path, "first", FIRST, 2)
    corrupt = snapshot_bytes(tmp_path, "first", FIRST, 3)
    corrupt = corrupt[:-1] + bytes([corrupt[-1] ^ 1])
    other = snapshot_bytes(tmp_path, "other", OTHER)
    snaps = store_with(tmp_path, served, other)
    newest = tmp_path / "ckpt" / "snap-000000000003-20990101T000000000000Z.safetensors"
    newest.write_bytes(corrupt)
    record(snaps, "first", FIRST)
    with caplog.at_level(logging.INFO):
        info, state = snaps.resume_candidate()
    assert state.model.model_name == "first" and state.model.version == 2
    assert info.version == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("sha256" in m and newest.stem in m for m in messages), messages
    assert any(
        m.startswith("skipping snapshot snap-000000000000-")
        and "it holds model 'other' with variables ['embedding float32[4, 4]']" in m
        and "serves model 'first' with variables ['w float32[3, 2]', 'b float32[2]']" in m
        for m in messages
    ), messages


def test_resume_refuses_when_only_other_models_snapshots_are_there(tmp_path) -> None:
    snaps = store_with(tmp_path, snapshot_bytes(tmp_path, "other", OTHER))
    record(snaps, "first", FIRST)
    with pytest.raises(StartupRefused) as err:
        snaps.resume_candidate()
    message = str(err.value)
    for needle in (
        "serves model 'first' with variables ['w float32[3, 2]', 'b float32[2]']",
        "only snapshots of model 'other' with variables ['embedding float32[4, 4]']",
        str(tmp_path / "ckpt" / RECORD_NAME),
        "start without --resume",
        "paramserve restore <id>",
    ):
        assert needle in message, (needle, message)


def test_resume_without_any_snapshot_starts_empty_whatever_the_record(tmp_path) -> None:
    snaps = store_with(tmp_path)
    assert snaps.resume_candidate() is None
    record(snaps, "first", FIRST)
    assert snaps.resume_candidate() is None


def test_resume_after_the_model_was_deleted_starts_empty(tmp_path, caplog) -> None:
    snaps = store_with(tmp_path, snapshot_bytes(tmp_path, "first", FIRST, 1))
    record(snaps, None)
    with caplog.at_level(logging.INFO):
        assert snaps.resume_candidate() is None
    assert any("the model was deleted" in r.getMessage() for r in caplog.records)


def test_resume_without_a_record_adopts_a_single_model(tmp_path, caplog) -> None:
    snaps = store_with(
        tmp_path,
        snapshot_bytes(tmp_path, "first", FIRST, 1),
        snapshot_bytes(tmp_path, "first", FIRST, 2),
    )
    with caplog.at_level(logging.INFO):
        _, state = snaps.resume_candidate()
    assert state.model.version == 2
    assert any("has no serving-model.json" in r.getMessage() for r in caplog.records)


def test_resume_without_a_record_refuses_to_choose_between_models(tmp_path) -> None:
    snaps = store_with(
        tmp_path,
        snapshot_bytes(tmp_path, "first", FIRST, 1),
        snapshot_bytes(tmp_path, "other", OTHER),
    )
    with pytest.raises(StartupRefused) as err:
        snaps.resume_candidate()
    message = str(err.value)
    assert "has no serving-model.json" in message and "snapshots of 2 models" in message
    assert "model 'first'" in message and "model 'other'" in message
    assert "Refusing to guess" in message


def test_resume_refuses_an_unreadable_record(tmp_path) -> None:
    snaps = store_with(tmp_path, snapshot_bytes(tmp_path, "first", FIRST, 1))
    (tmp_path / "ckpt" / RECORD_NAME).write_text('{"format": "paramserve.serving_model", "mod')
    with pytest.raises(StartupRefused) as err:
        snaps.resume_candidate()
    assert f"{tmp_path / 'ckpt' / RECORD_NAME} is not a valid record" in str(err.value)
    assert "Delete" in str(err.value)


def test_identity_reads_the_header_only(tmp_path) -> None:
    snaps = store_with(tmp_path, snapshot_bytes(tmp_path, "other", OTHER))
    (info,) = snaps.list()
    assert snaps.identity(info) == ModelIdentity("other", (("embedding", "float32", (4, 4)),))
    info.path.write_bytes(b"garbage")
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        snaps.identity(info)


def test_identity_descriptions_are_bounded() -> None:
    identity = ModelIdentity("big", tuple((f"v{i}", "float32", (i,)) for i in range(100)))
    text = identity.describe()
    assert text.startswith("model 'big' with variables ['v0 float32[0]'")
    assert text.endswith("and 92 more")
