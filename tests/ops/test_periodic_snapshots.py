"""Periodic snapshots with retention, a kill -9, and --resume from the newest *valid* snapshot."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from paramserve.v1 import parameter_server_pb2 as pb
from tests.support.models.tiny import grads_for, initial_variables
from tests.support.wire import create_model_requests, push_requests, read_stream

LEARNING_RATE = np.float32(0.5)  # SGD_JSON of the transport helpers


def _snapshots(directory: Path) -> list[Path]:
    return sorted(directory.glob("snap-*.safetensors"))


def _version(path: Path) -> int:
    return int(path.name[5:17])


def _expected_weights(pushes: int) -> dict[str, np.ndarray]:
    """SGD applied ``pushes`` times, one float32 step after another as the server does."""
    weights = initial_variables()
    for _ in range(pushes):
        for name, grad in grads_for().items():
            weights[name] = weights[name] - LEARNING_RATE * grad
    return weights


def _wait_for_snapshot_of(server, directory: Path, version: int, *, keep: int) -> None:
    """Wait for the server to log the periodic snapshot of ``version``: it does so after the
    rename and the retention pass, so the directory is settled (polling the directory could
    see the new file before retention removed the oldest one)."""
    server.wait_for(
        lambda e: e.get("event") == "snapshot_written" and e.get("version") == version,
        timeout_s=60,
    )
    versions = [_version(p) for p in _snapshots(directory)]
    assert version in versions and len(versions) <= keep, versions


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped bit in the last tensor's payload: only the sha256 check can tell
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["bit-flipped", "truncated"])
def test_periodic_snapshots_retention_and_resume_skips_a_damaged_newest(
    start_process, tmp_path, how
):
    ckpt = tmp_path / "ckpt"
    flags = ["--mode", "async", "--checkpoint-dir", str(ckpt), "--snapshot-every-s", "0.2"]
    flags += ["--keep-snapshots", "2"]
    server = start_process(*flags)
    with server.channel() as channel:
        stub = server.stub(channel)
        stub.CreateModel(create_model_requests(initial_variables()), timeout=20)
        for sequence in range(1, 5):
            stub.Push(iter(push_requests(grads_for(), sequence=sequence)), timeout=20)
            _wait_for_snapshot_of(server, ckpt, sequence, keep=2)
    # The version no longer moves: no new periodic snapshots. (The sleep only gives a bug
    # time to show; nothing needs to happen in it, so a slow machine cannot fail this.)
    time.sleep(0.5)
    assert [_version(p) for p in _snapshots(ckpt)] == [3, 4]  # keep the newest 2
    server.send_signal(signal.SIGKILL)  # a crash: no final snapshot
    assert server.wait(60) == -signal.SIGKILL

    previous, newest = _snapshots(ckpt)
    _corrupt(newest, how)
    resumed = start_process(*flags, "--resume")
    skipped = resumed.wait_for(lambda e: e["level"] == "warning" and newest.stem in e["message"])
    assert "skipping snapshot" in skipped["message"]
    event = resumed.wait_for_event("resumed")
    assert (event["snapshot_id"], event["version"]) == (previous.stem, 3)
    time.sleep(0.5)  # periodic ticks at an unchanged version write nothing (no copy of v3)
    assert not [e for e in resumed.events if e.get("event") == "snapshot_written"]
    assert _snapshots(ckpt) == [previous, newest]
    with resumed.channel() as channel:
        stub = resumed.stub(channel)
        version, weights = read_stream(stub.Pull(pb.PullRequest(), timeout=20))
        assert version == 3
        for name, value in _expected_weights(3).items():
            np.testing.assert_array_equal(weights[name], value)
        # The dedupe table came back with the weights: push 3 was applied, push 4 was lost
        # with the damaged snapshot and is applied (once) when the worker resends it.
        push = stub.Push(iter(push_requests(grads_for(), sequence=3)), timeout=20)
        assert push.duplicate and push.version == 3
        push = stub.Push(iter(push_requests(grads_for(), sequence=4)), timeout=20)
        assert not push.duplicate and push.version == 4
    assert resumed.stop() == 0
    version, _ = max((_version(p), p) for p in _snapshots(ckpt))
    assert version == 4  # the final snapshot of the resumed run


def test_resume_without_a_valid_snapshot_starts_empty(start_process, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    damaged = ckpt / "snap-000000000007-20260101T000000000000Z.safetensors"
    damaged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (ckpt / ".tmp-snap-000000000008-crashed.safetensors").write_bytes(b"half written")
    server = start_process("--checkpoint-dir", str(ckpt), "--resume")
    server.wait_for(lambda e: e["level"] == "warning" and damaged.stem in e["message"])
    server.wait_for_event("resume_empty")
    with server.channel() as channel:
        status = server.stub(channel).GetStatus(pb.GetStatusRequest(), timeout=20)
        assert not status.has_model and status.serving
        with pytest.raises(grpc.RpcError) as missing:
            read_stream(server.stub(channel).Pull(pb.PullRequest(), timeout=20))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.stop() == 0
    assert damaged.exists()  # evidence is kept for the operator, never deleted on resume
