"""SnapshotStore: round trips, refusal of every kind of damaged file, crashes, retention."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from paramserve.server import snapshots as snapshots_module
from paramserve.server.aggregator import AggregationConfig, Aggregator
from paramserve.server.errors import InvalidArgument, NotFound
from paramserve.server.snapshots import SnapshotState, SnapshotStore, utc_now
from paramserve.server.store import ModelStore
from tests.support.asserts import assert_same as assert_bitwise_equal
from tests.support.asserts import assert_state_equal
from tests.support.models.mixed import grads_for

BF16 = np.dtype(ml_dtypes.bfloat16)


def mixed_vars() -> dict[str, np.ndarray]:
    """Every dtype a variable may have, plus a scalar and an empty array."""
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.standard_normal((4, 3)).astype(np.float32),
        "half": rng.standard_normal(3).astype(np.float16),
        "brain": rng.standard_normal((2, 2)).astype(BF16),
        "double": rng.standard_normal(2),
        "scale": np.array(0.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def trained(steps: int = 2) -> tuple[ModelStore, Aggregator]:
    store = ModelStore()
    store.create_model("m", {"class_name": "Adam", "config": {"amsgrad": True}}, mixed_vars())
    agg = Aggregator(store, AggregationConfig(mode="async"))
    for seq in range(1, steps + 1):
        agg.push("w", seq, 0, grads_for(mixed_vars(), seq))
    return store, agg


def state_of(store: ModelStore, agg: Aggregator) -> SnapshotState:
    with store.lock:
        return SnapshotState(store.export_state(), agg.export_state())


def save_trained(snaps: SnapshotStore, steps: int) -> SnapshotState:
    store, agg = trained(steps)
    state = state_of(store, agg)
    snaps.save(state)
    return state


# --- round trip -------------------------------------------------------------------------
def test_round_trip_restores_everything(tmp_path: Path) -> None:
    store, agg = trained(2)
    state = state_of(store, agg)
    snaps = SnapshotStore(tmp_path)
    info = snaps.save(state)
    assert info.version == 2 and info.id.startswith("snap-000000000002-")
    assert info.path == tmp_path / f"{info.id}.safetensors"
    assert info.size_bytes == info.path.stat().st_size
    assert info.created_at == state.created_at
    assert snaps.list() == [info]

    loaded = snaps.load(info.id)
    assert loaded.created_at == state.created_at
    assert loaded.aggregation == state.aggregation
    assert loaded.model.model_name == "m" and loaded.model.version == 2
    assert loaded.model.optimizer == state.model.optimizer
    assert loaded.model.variables["brain"].dtype == BF16
    assert_bitwise_equal(loaded.model.variables, state.model.variables)
    assert_bitwise_equal(loaded.model.optimizer_state, state.model.optimizer_state)

    # Restored into a fresh server, training continues exactly as in the original.
    fresh = ModelStore()
    fresh_agg = Aggregator(fresh, AggregationConfig(mode="async"))
    with fresh.lock:
        fresh.import_state(loaded.model)
        fresh_agg.import_state(loaded.aggregation)
    assert fresh_agg.push("w", 2, 0, grads_for(mixed_vars(), 9)).duplicate
    for a in (agg, fresh_agg):
        a.push("w", 3, 0, grads_for(mixed_vars(), 3))
    assert_bitwise_equal(fresh.read()[1], store.read()[1])
    assert_state_equal(fresh.optimizer_state(), store.optimizer_state())


def test_file_is_plain_safetensors_with_a_manifest(tmp_path: Path) -> None:
    state = save_trained(snaps := SnapshotStore(tmp_path), 1)
    (info,) = snaps.list()
    with safetensors.safe_open(info.path, framework="np") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert f.get_tensor("variables/brain").dtype == np.uint16  # bfloat16 as a uint16 view
    assert meta["format"] == "paramserve.snapshot" and meta["format_version"] == "1"
    manifest = json.loads(meta["manifest"])
    assert [e["name"] for e in manifest["variables"]] == list(state.model.variables)
    assert [e["name"] for e in manifest["optimizer_state"]] == list(state.model.optimizer_state)
    assert {e["dtype"] for e in manifest["variables"]} == {
        "float32",
        "float16",
        "bfloat16",
        "float64",
    }
    assert all(len(e["sha256"]) == 64 for e in manifest["variables"])
    assert keys == {f"variables/{n}" for n in state.model.variables} | {
        f"optimizer/{k}" for k in state.model.optimizer_state
    }


def test_same_created_at_gets_distinct_ids(tmp_path: Path) -> None:
    store, agg = trained(1)
    state = state_of(store, agg)
    snaps = SnapshotStore(tmp_path)
    a, b = snaps.save(state), snaps.save(state)
    assert a.id != b.id and [i.id for i in snaps.list()] == [a.id, b.id]
    with pytest.raises(InvalidArgument, match="RFC 3339"):
        snaps.save(SnapshotState(state.model, state.aggregation, created_at="yesterday"))


# --- damaged files ----------------------------------------------------------------------
def rewrite(path: Path, edit: Callable[[dict, dict, dict], None]) -> None:
    """Rewrite a snapshot as valid safetensors after ``edit(tensors, metadata, manifest)``."""
    with safetensors.safe_open(path, framework="np") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    text = metadata["manifest"]
    manifest = json.loads(text)
    edit(tensors, metadata, manifest)
    if metadata["manifest"] == text:  # unless the edit replaced the manifest text itself
        metadata["manifest"] = json.dumps(manifest)
    safetensors.numpy.save_file(tensors, path, metadata=metadata)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[9] = ord("#")  # inside the JSON header
    path.write_bytes(bytes(data))


def set_meta(key: str, value: str) -> Callable[[dict, dict, dict], None]:
    return lambda t, meta, m: meta.update({key: value})


def drop_tensor(t: dict, meta: dict, m: dict) -> None:
    del t["optimizer/dense_kernel_momentum"]


def extra_tensor(t: dict, meta: dict, m: dict) -> None:
    t["variables/sneaky"] = np.zeros(3, np.float32)


def manifest_shape(t: dict, meta: dict, m: dict) -> None:
    m["variables"][0]["shape"] = [3, 4]


def other_optimizer(t: dict, meta: dict, m: dict) -> None:
    m["optimizer"] = {"class_name": "SGD", "config": {"momentum": 0.9}}


def other_version(t: dict, meta: dict, m: dict) -> None:
    m["version"] = 5


def bad_aggregation(t: dict, meta: dict, m: dict) -> None:
    m["aggregation"]["workers"]["w"]["last_sequence"] = -3


def retyped(section: str, name: str, dtype: str) -> Callable[[dict, dict, dict], None]:
    """Store one tensor with another dtype, manifest and checksum consistent with it."""

    def edit(t: dict, meta: dict, m: dict) -> None:
        key = ("variables/" if section == "variables" else "optimizer/") + name
        value = t[key].astype(dtype)
        t[key] = value
        for entry in m[section]:
            if entry["name"] == name:
                entry["dtype"] = dtype
                entry["sha256"] = hashlib.sha256(value.tobytes()).hexdigest()

    return edit


DAMAGE = [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated or corrupt"),
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b""), "truncated or corrupt"),
    (flip_last_byte, "fails its sha256 check"),
    (flip_header_byte, "truncated or corrupt"),
    (lambda p: rewrite(p, set_meta("format_version", "2")), "format_version '2' is not supported"),
    (lambda p: rewrite(p, set_meta("format", "other")), "not a paramserve snapshot"),
    (lambda p: rewrite(p, set_meta("manifest", "{nope")), "not valid JSON"),
    (lambda p: rewrite(p, drop_tensor), "do not match its manifest"),
    (lambda p: rewrite(p, extra_tensor), "unlisted ['variables/sneaky']"),
    (lambda p: rewrite(p, manifest_shape), "the manifest says float32 [3, 4]"),
    (lambda p: rewrite(p, other_optimizer), "does not match the optimizer config"),
    (lambda p: rewrite(p, other_version), "version 5"),
    (lambda p: rewrite(p, bad_aggregation), "last_sequence"),
    (
        lambda p: rewrite(p, retyped("optimizer_state", "dense_kernel_momentum", "float64")),
        "keeps it as float32",
    ),
    (
        lambda p: rewrite(p, retyped("variables", "scale", "int32")),
        "'scale' has dtype int32, expected a floating dtype",
    ),
]


@pytest.mark.parametrize(("damage", "needle"), DAMAGE)
def test_damaged_files_are_refused(tmp_path: Path, damage, needle: str) -> None:
    snaps = SnapshotStore(tmp_path)
    save_trained(snaps, 1)
    time.sleep(0.001)
    save_trained(snaps, 2)
    older, newer = snaps.list()
    original = newer.path.read_bytes()
    damage(newer.path)
    assert newer.path.read_bytes() != original
    with pytest.raises(InvalidArgument) as err:
        snaps.load(newer.id)
    assert needle in str(err.value), str(err.value)
    assert snaps.latest_valid() == older


# --- crashes, temp files, retention -----------------------------------------------------
def test_crash_before_rename_leaves_previous_snapshot(tmp_path, monkeypatch) -> None:
    snaps = SnapshotStore(tmp_path)
    save_trained(snaps, 1)
    (before,) = snaps.list()

    def power_cut(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(snapshots_module.os, "replace", power_cut)
    with pytest.raises(OSError, match="disk vanished"):
        save_trained(snaps, 2)
    monkeypatch.undo()
    assert snaps.list() == [before]
    assert sorted(p.name for p in tmp_path.iterdir()) == [before.path.name]  # temp removed
    assert snaps.latest_valid() == before


def test_partial_temp_files_are_ignored_and_removed_by_the_daemons_store(tmp_path: Path) -> None:
    snaps = SnapshotStore(tmp_path)
    save_trained(snaps, 1)
    (good,) = snaps.list()
    # What crashes in the middle of writes leave, fresh or old, and foreign files.
    leftovers = [
        tmp_path / f".tmp-snap-000000000009-20300101T000000000000Z-{'a' * 32}.safetensors",
        tmp_path / ".tmp-upload-fresh.safetensors",  # the old naming of an upload
        tmp_path / ".tmpAbC123",  # safetensors' own temporary file, written loose before
        tmp_path / ".tmp-record-0123.json",
    ]
    for path in leftovers:
        path.write_bytes(good.path.read_bytes()[:100])
    workdir = tmp_path / ".tmp-snap-000000000009-20300101T000000000000Z-0123"
    workdir.mkdir()
    (workdir / ".tmpXyZ789").write_bytes(b"x" * 100)  # a kill during the library's write
    old = time.time() - 2 * 3600
    os.utime(leftovers[0], (old, old))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "snap-bad.safetensors").write_text("x")
    assert snaps.list() == [good]
    assert snaps.latest_valid() == good
    # A store that does not lock the directory removes nothing (a daemon may be writing).
    SnapshotStore(tmp_path)
    assert all(p.exists() for p in [*leftovers, workdir])
    # The daemon's store locks the directory, so every leftover is debris, whatever its age.
    daemons = SnapshotStore(tmp_path, exclusive=True)
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [good.path.name, ".paramserve.lock", "notes.txt", "snap-bad.safetensors"]
        )
        assert daemons.list() == [good]
    finally:
        daemons.close()


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    snaps = SnapshotStore(tmp_path, keep_last=2)
    store, agg = trained(1)
    infos = []
    for seq in range(2, 6):
        agg.push("w", seq, 0, grads_for(mixed_vars(), seq))
        infos.append(snaps.save(state_of(store, agg)))
    assert snaps.list() == infos[-2:]
    assert [i.version for i in snaps.list()] == [4, 5]
    assert not infos[0].path.exists()
    with pytest.raises(ValueError):
        SnapshotStore(tmp_path, keep_last=0)


def test_latest_valid_and_ids(tmp_path: Path) -> None:
    snaps = SnapshotStore(tmp_path / "nested" / "dir")
    assert snaps.latest_valid() is None and snaps.list() == []
    for bad in ["../etc/passwd", "snap-000000000001-20260101T000000000000Z/../x", "", "snap-1"]:
        with pytest.raises(InvalidArgument, match="not of the form"):
            snaps.path(bad)
    missing = "snap-000000000001-20260101T000000000000Z"
    with pytest.raises(NotFound):
        snaps.path(missing)
    with pytest.raises(NotFound):
        snaps.load(missing)


# --- uploads ----------------------------------------------------------------------------
def chunks_of(data: bytes, size: int = 1000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_import_file(tmp_path: Path) -> None:
    source = SnapshotStore(tmp_path / "a")
    state = save_trained(source, 2)
    (original,) = source.list()
    data = original.path.read_bytes()
    target = SnapshotStore(tmp_path / "b", keep_last=1)
    info = target.import_file(chunks_of(data), size_bytes=len(data))
    assert (info.id, info.version, info.size_bytes) == (original.id, 2, len(data))
    assert_bitwise_equal(target.load(info.id).model.variables, state.model.variables)
    again = target.import_file(iter(chunks_of(data, 333)), size_bytes=len(data))
    assert again == info and target.list() == [info]


@pytest.mark.parametrize(
    ("payload", "declared", "needle"),
    [
        (lambda d: d[:-5], len, "ended early: "),
        (lambda d: d, lambda d: len(d) - 5, "more than the declared"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), len, "sha256"),
        (lambda d: b"not a snapshot at all", lambda d: 21, "truncated or corrupt"),
    ],
)
def test_bad_uploads_store_nothing(tmp_path: Path, payload, declared, needle) -> None:
    source = SnapshotStore(tmp_path / "a")
    save_trained(source, 1)
    data = source.list()[0].path.read_bytes()
    target = SnapshotStore(tmp_path / "b")
    with pytest.raises(InvalidArgument, match=needle):
        target.import_file(chunks_of(payload(data)), size_bytes=declared(data))
    assert list((tmp_path / "b").iterdir()) == []  # no snapshot, no temp file


def test_utc_now_is_rfc3339() -> None:
    stamp = utc_now()
    assert stamp.endswith("Z") and stamp[10] == "T" and len(stamp) == 27
