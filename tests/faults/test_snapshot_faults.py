"""Fault 4: damaged snapshots are refused with a clear error and change nothing; a crash in
the middle of writing a snapshot leaves the previous one valid for ``--resume``.

The damaged files are uploaded (``UploadSnapshot`` with restore) to a live daemon, or placed
in its checkpoint directory and restored by id; after each refusal the weights, every
optimizer slot, the version, the dedupe table and the snapshot list are what they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from paramserve.client import Client, InvalidArgumentError, ParamServeError, SnapshotInfo
from tests.support.asserts import assert_same
from tests.support.models.dense import ADAM, gradients, initial_weights
from tests.support.processes import Processes, ServerProcess


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _rewrite(source: Path, target: Path, edit: Callable[[dict, dict, dict], None]) -> Path:
    """A well-formed safetensors copy of ``source`` after ``edit(tensors, metadata, manifest)``;
    checksums of the tensors are recomputed, so the edit is the file's only defect."""
    with safetensors.safe_open(source, framework="np") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    manifest = json.loads(metadata["manifest"])
    edit(tensors, metadata, manifest)
    for section in ("variables", "optimizer_state"):
        for entry in manifest[section]:
            if entry["tensor"] in tensors:
                entry["sha256"] = _sha256(tensors[entry["tensor"]])
    metadata["manifest"] = json.dumps(manifest)
    safetensors.numpy.save_file(tensors, target, metadata=metadata)
    return target


def _header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x55
    return bytes(out)


def _flip_manifest_checksum(data: bytes) -> bytes:
    """Change one hex digit of the first tensor checksum in the manifest (header stays JSON)."""
    at = data.index(b"sha256", 8) + len(b'sha256\\": \\"')
    digit = data[at : at + 1]
    assert digit in b"0123456789abcdef", digit
    return data[:at] + (b"1" if digit != b"1" else b"2") + data[at + 1 :]


def _other_model_slots(tensors: dict, metadata: dict, manifest: dict) -> None:
    """The optimizer state of a model with another definition (the kernel is 4 x 4)."""
    for entry in manifest["optimizer_state"]:
        if entry["shape"] == [16, 8]:
            entry["shape"] = [4, 4]
            tensors[entry["tensor"]] = np.zeros((4, 4), np.float32)


def _other_optimizer(tensors: dict, metadata: dict, manifest: dict) -> None:
    manifest["optimizer"] = {"class_name": "SGD", "config": {"momentum": 0.9}}


def _live_state(client: Client) -> dict:
    status = client.status()
    return {
        "version": status.version,
        "workers": [(w.worker_id, w.last_sequence, w.pushes) for w in status.workers],
        "weights": dict(client.pull()),
        "optimizer": dict(client.optimizer_state()),
        "snapshots": [s.id for s in client.list_snapshots()],
    }


def _assert_unchanged(client: Client, before: dict, ckpt: Path) -> None:
    after = _live_state(client)
    assert (after["version"], after["workers"]) == (before["version"], before["workers"])
    assert after["snapshots"] == before["snapshots"]
    assert_same(after["weights"], before["weights"])
    assert_same(after["optimizer"], before["optimizer"])
    assert not list(ckpt.glob(".tmp-*"))  # a refused upload leaves no file behind


BAD_FILES: list[tuple[str, Callable[[bytes, Path, Path], Path], str]] = [
    ("truncated to half", lambda d, s, t: _write(t, d[: len(d) // 2]), "truncated or corrupt"),
    ("truncated to 20 bytes", lambda d, s, t: _write(t, d[:20]), "truncated or corrupt"),
    (
        "flipped byte in a tensor",
        lambda d, s, t: _write(t, _flip(d, 8 + _header_length(d) + 100)),
        "fails its sha256 check",
    ),
    (
        "flipped byte in the header length",
        lambda d, s, t: _write(t, _flip(d, 3)),
        "truncated or corrupt",
    ),
    (
        "flipped byte in the header JSON",
        lambda d, s, t: _write(t, _flip(d, 8)),
        "truncated or corrupt",
    ),
    (
        "changed checksum in the manifest",
        lambda d, s, t: _write(t, _flip_manifest_checksum(d)),
        "fails its sha256 check",
    ),
    (
        "another format version",
        lambda d, s, t: _rewrite(s, t, lambda _t, meta, _m: meta.update(format_version="2")),
        "format_version '2' is not supported",
    ),
    (
        "optimizer state of another model definition",
        lambda d, s, t: _rewrite(s, t, _other_model_slots),
        "does not match",
    ),
    (
        "optimizer config that does not fit the state",
        lambda d, s, t: _rewrite(s, t, _other_optimizer),
        "does not match the optimizer config",
    ),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@dataclass
class Trained:
    server: ServerProcess
    client: Client
    ckpt: Path
    good: Path  # the snapshot at version 3, downloaded
    snap: SnapshotInfo


@pytest.fixture
def trained(procs: Processes, tmp_path: Path) -> Iterator[Trained]:
    """An async daemon with a snapshot at version 3 and live state at version 5."""
    ckpt = tmp_path / "ckpt"
    server = procs.server(
        "--mode", "async", "--checkpoint-dir", ckpt, "--no-snapshot-on-exit"
    )  # fmt: skip
    with Client(server.address, worker_id="worker-0", timeout_s=30.0) as client:
        client.create_model(initial_weights(), ADAM)
        for sequence in (1, 2, 3):
            client.push(gradients("worker-0", sequence), sequence=sequence)
        snap = client.snapshot()
        good = client.download_snapshot(snap.id, tmp_path / "good.safetensors")
        for sequence in (4, 5):
            client.push(gradients("worker-0", sequence), sequence=sequence)
        yield Trained(server, client, ckpt, good, snap)


def test_damaged_or_mismatched_snapshots_are_refused_and_change_nothing(trained, tmp_path):
    client, ckpt, good = trained.client, trained.ckpt, trained.good
    before = _live_state(client)
    data = good.read_bytes()
    for label, make, needle in BAD_FILES:
        bad = make(data, good, tmp_path / "bad.safetensors")
        assert bad.read_bytes() != data, label
        # Over the wire: uploaded and restored in one call.
        with pytest.raises(InvalidArgumentError) as err:
            client.upload_snapshot(bad, restore=True)
        assert needle in str(err.value), (label, str(err.value))
        _assert_unchanged(client, before, ckpt)
        # On the server's disk under a snapshot id, restored by id.
        planted = ckpt / "snap-000000000003-20200101T000000000000Z.safetensors"
        shutil.copy(bad, planted)
        with pytest.raises(InvalidArgumentError) as err:
            client.restore(planted.name.removesuffix(".safetensors"))
        assert needle in str(err.value), (label, str(err.value))
        planted.unlink()
        _assert_unchanged(client, before, ckpt)

    # The daemon still works, and the good file still restores.
    assert client.upload_snapshot(good, restore=True).version == 3
    assert_same(client.pull(), _live_at_snapshot(good))


def _live_at_snapshot(path: Path) -> dict[str, np.ndarray]:
    """The weights stored in a snapshot file, in model order."""
    with safetensors.safe_open(path, framework="np") as f:
        manifest = json.loads(f.metadata()["manifest"])
        return {e["name"]: f.get_tensor(e["tensor"]) for e in manifest["variables"]}


def test_snapshot_of_another_model_definition_is_refused(trained, procs, tmp_path):
    client = trained.client
    other = procs.server("--mode", "async", "--checkpoint-dir", tmp_path / "other")
    with Client(other.address, timeout_s=30.0) as admin:
        admin.create_model({"embedding": np.ones((4, 4), np.float32)}, ADAM)
        path = admin.download_snapshot(admin.snapshot().id, tmp_path / "other.safetensors")
    before = _live_state(client)
    with pytest.raises(ParamServeError) as err:
        client.upload_snapshot(path, restore=True)
    assert err.value.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)
    assert "definition" in str(err.value)
    _assert_unchanged(client, before, trained.ckpt)  # not restored, and not stored either


def test_corrupt_newest_snapshot_resume_uses_the_previous_one(trained, procs, tmp_path):
    server, client, ckpt, good, snap = (
        trained.server, trained.client, trained.ckpt, trained.good, trained.snap
    )  # fmt: skip
    newest = client.snapshot()
    assert newest.version == 5
    path = ckpt / f"{newest.id}.safetensors"
    path.write_bytes(_flip(path.read_bytes(), path.stat().st_size - 1))
    server.kill()
    resumed = procs.server(
        "--port", str(server.port), "--mode", "async", "--checkpoint-dir", ckpt, "--resume"
    )  # fmt: skip
    resumed.wait_for_message(rf"skipping snapshot {newest.id}: .*sha256", 30)
    resumed.wait_for_message(rf"resumed from snapshot {snap.id} at version 3", 30)
    assert client.status().version == 3
    assert_same(client.pull(), _live_at_snapshot(good))


BIG_ELEMENTS = 4 << 20  # one float32 variable of 16 MiB
# Run in the daemon: once safetensors writes the snapshot of version 2, the process dies as
# soon as the library tries to grow its temporary file past 1 MiB (RLIMIT_FSIZE, with
# SIGXFSZ's default action, which Python otherwise ignores): abruptly, like kill -9, inside the
# library's own write, whatever the machine's speed. (A kill the test sends when it sees the
# library's temporary file must land within that write: tens of milliseconds, a window a busy
# machine can let the test miss.)
DIE_MID_WRITE_OF_SNAPSHOT_2 = """
import resource, signal
import safetensors.numpy

signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # here: only the main thread may set it
_save_file = safetensors.numpy.save_file

def _save_file_dying_mid_write(tensors, filename, metadata=None):
    if "snap-000000000002-" in str(filename):
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    return _save_file(tensors, filename, metadata=metadata)

safetensors.numpy.save_file = _save_file_dying_mid_write
"""


@pytest.mark.slow
def test_kill_9_while_writing_a_snapshot_leaves_the_previous_one_for_resume(
    procs: Processes, tmp_path: Path
):
    ckpt = tmp_path / "ckpt"
    flags = ["--mode", "async", "--checkpoint-dir", ckpt, "--no-snapshot-on-exit"]
    server = procs.server(*flags, preamble=DIE_MID_WRITE_OF_SNAPSHOT_2)
    small = np.arange(4, dtype=np.float32)
    sgd = {"class_name": "SGD", "config": {"learning_rate": 0.5}}
    with Client(server.address, worker_id="worker-0", timeout_s=120.0) as client:
        client.create_model({"big": np.zeros(BIG_ELEMENTS, np.float32), "small": small}, sgd)
        client.push({"small": np.ones(4, np.float32)}, sequence=1)  # gradients for a subset
        first = client.snapshot()
        client.push({"small": np.full(4, 2, np.float32)}, sequence=2)

        errors: list[BaseException] = []

        def snapshot() -> None:
            try:
                client.snapshot(timeout_s=60)
            except ParamServeError as exc:  # the server dies under it
                errors.append(exc)

        writer = threading.Thread(target=snapshot)
        writer.start()
        # Killed while safetensors writes its own temporary file (.tmpXXXXXX, next to the
        # name it was given): that file must land in a temporary name the daemon owns.
        assert server.proc.wait(timeout=60) == -signal.SIGXFSZ, server.log()
        writer.join(timeout=60)
        assert errors and not writer.is_alive()
    (library_temp,) = _library_temps(ckpt)
    written = _size(library_temp)
    assert written < BIG_ELEMENTS * 4  # cut off before the write completed

    # Killed mid-write: the new snapshot never got its name, the previous one is intact, and
    # the library's temporary file is inside the daemon's own temporary directory.
    assert [p.name for p in ckpt.glob("snap-*")] == [f"{first.id}.safetensors"]
    assert library_temp.parent != ckpt, library_temp
    assert library_temp.parent.name.startswith(".tmp-snap-000000000002-")
    assert library_temp.parent.is_dir()  # left behind by the kill
    # Every other kind of leftover a crash can leave, old and new.
    leftovers = [
        ckpt / ".tmp-snap-000000000001-20200101T000000000000Z-old.safetensors",
        ckpt / ".tmp-upload-0123456789abcdef.safetensors",
        ckpt / ".tmpAb12Cd",
        ckpt / ".tmp-record-0123456789abcdef.json",
    ]
    for path in leftovers:
        path.write_bytes(b"\0" * 4096)
    os.utime(leftovers[0], (time.time() - 7200, time.time() - 7200))  # left hours ago
    (ckpt / ".tmp-snap-000000000003-x").mkdir()
    (ckpt / ".tmp-snap-000000000003-x" / ".tmpZz99Yy").write_bytes(b"\0" * 4096)

    resumed = procs.server("--port", str(server.port), *flags, "--resume")
    resumed.wait_for_message(rf"resumed from snapshot {first.id} at version 1", 60)
    resumed.wait_for_message(rf"removed leftover .*{library_temp.parent.name}", 60)
    with Client(resumed.address, timeout_s=60.0) as client:
        assert [s.id for s in client.list_snapshots()] == [first.id]
        weights = client.pull()
    assert weights.version == 1
    np.testing.assert_array_equal(weights["small"], small - np.float32(0.5))
    assert not weights["big"].any()
    # Start-up removed every leftover (the directory is locked: none can be in use).
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [f"{first.id}.safetensors", ".paramserve.lock", "serving-model.json"]
    )
    print(f"died writing a {BIG_ELEMENTS >> 18} MiB snapshot ({written} bytes in the file)")


def _library_temps(directory: Path) -> list[Path]:
    """safetensors' temporary files (``.tmp`` and six characters) in or below ``directory``."""
    return [
        Path(root, name)
        for root, _, names in os.walk(directory)  # os.walk ignores folders that vanish
        for name in names
        if re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name)
    ]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed by now
        return 0
