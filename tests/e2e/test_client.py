"""Client SDK against a real server: exactly-once pushes, pulls, snapshots, errors."""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import (
    AlreadyExistsError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ParamServeError,
    SparseRows,
    default_worker_id,
)
from tests.support.asserts import assert_same
from tests.support.models.embedding import initial_weights
from tests.support.waiting import count_waiters, wait_until

SGD = {"class_name": "SGD", "config": {"learning_rate": 0.5}}


@pytest.fixture
def server(start_server):
    return start_server(mode="async")


@pytest.fixture
def admin(server, connect):
    client = connect(server)
    client.create_model(initial_weights(), SGD)
    return client


def ones(name: str) -> np.ndarray:
    return np.ones_like(initial_weights()[name])


def test_duplicate_push_is_acknowledged_not_reapplied(server, admin, connect):
    first = connect(server, worker_id="dup")
    assert first.push({"dense/bias": ones("dense/bias")}).version == 1
    after_one = admin.pull()

    # The same client resending after a lost reply: acknowledged, not applied again.
    result = first.push({"dense/bias": 5 * ones("dense/bias")}, sequence=first.last_sequence)
    assert result.duplicate and result.version == 1
    assert_same(admin.pull(), after_one)

    # Another client (a restarted worker) reusing the sequence is refused, naming the last
    # sequence, instead of being silently taken for a duplicate.
    other = connect(server, worker_id="dup")
    with pytest.raises(FailedPreconditionError, match="pushed up to sequence 1"):
        other.push({"dense/bias": 5 * ones("dense/bias")}, sequence=1)
    assert_same(admin.pull(), after_one)

    # A restarted worker with the same id continues after the server's last_sequence.
    rejoined = connect(server, worker_id="dup")
    result = rejoined.push({"dense/bias": ones("dense/bias")})
    assert not result.duplicate and result.sequence == 2 and result.version == 2
    assert admin.status().worker("dup").last_sequence == 2


def test_default_worker_ids_are_unique_and_start_at_sequence_one(server, admin, connect):
    worker_id = default_worker_id()
    host, pid, suffix = worker_id.rsplit("-", 2)
    assert host == socket.gethostname() and pid == str(os.getpid()) and len(suffix) == 4
    a, b = connect(server), connect(server)
    assert a.worker_id != b.worker_id
    assert a.push({"dense/bias": ones("dense/bias")}).sequence == 1


def test_pull_rows_of_a_2d_variable(admin):
    admin.push({"embedding": ([1, 1, 6], np.ones((3, 4), np.float32))})
    full = admin.pull(["embedding"])["embedding"]
    rows = admin.pull(rows={"embedding": [6, 1, 0]})
    assert list(rows) == ["embedding"] and rows.version == 1
    picked = rows["embedding"]
    assert isinstance(picked, SparseRows)
    assert picked.indices.tolist() == [6, 1, 0]
    assert_same({"r": picked.values}, {"r": full[[6, 1, 0]]})
    with pytest.raises(InvalidArgumentError):
        admin.pull(rows={"embedding": [8]})
    with pytest.raises(NotFoundError, match="nope"):
        admin.pull(rows={"nope": [0]})


def test_pull_min_version_waits_for_the_push(server, admin, connect):
    waiting = count_waiters(server.core.store)
    pusher = connect(server)
    with ThreadPoolExecutor(1) as pool:
        pulled = pool.submit(admin.pull, min_version=1, timeout_s=60)
        wait_until(lambda: waiting() == 1)  # the pull waits on the server for version 1
        assert not pulled.done()
        pusher.push({"dense/bias": ones("dense/bias")})
        weights = pulled.result(60)
    assert weights.version == 1
    assert admin.base_version == 1
    with pytest.raises(DeadlineExceededError) as info:
        admin.pull(min_version=5, timeout_s=0.3)
    assert isinstance(info.value, TimeoutError)


def test_pulled_arrays_are_fresh_and_writable(admin):
    a, b = admin.pull(), admin.pull()
    for name in a:
        assert a[name].flags.writeable
        a[name][...] = 7
    assert_same(b, admin.pull())


def test_snapshot_download_upload_round_trip(start_server, admin, connect, tmp_path, capsys):
    admin.push({"dense/kernel": ones("dense/kernel")})
    snap = admin.snapshot()
    assert [s.id for s in admin.list_snapshots()] == [snap.id]
    path = admin.download_snapshot(snap.id, tmp_path / "snap.safetensors", progress=True)
    assert path.stat().st_size == snap.size_bytes
    assert "download" in capsys.readouterr().err  # the tqdm bar, forced on

    other = connect(start_server(mode="async"))
    info = other.upload_snapshot(path, restore=True, progress=False)
    assert (info.id, info.version) == (snap.id, 1)
    assert_same(other.pull(), admin.pull())
    assert_same(other.optimizer_state(), admin.optimizer_state())
    assert [s.id for s in other.list_snapshots()] == [snap.id]
    with pytest.raises(NotFoundError):
        other.download_snapshot("snap-000000000001-20000101T000000000000Z", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_errors_carry_code_and_server_message(server, admin, connect):
    assert admin.create_model(initial_weights(), SGD).created is False  # idempotent
    same = optim_core.SGD(learning_rate=0.5)  # an instance serializes to the same config
    assert admin.create_model(initial_weights(), same).created is False
    with pytest.raises(AlreadyExistsError):
        admin.create_model({"other": np.zeros(2, np.float32)}, SGD)
    with pytest.raises(NotFoundError, match="nope"):
        admin.push({"nope": np.zeros(3, np.float32)})
    with pytest.raises(InvalidArgumentError, match="shape") as info:
        admin.push({"dense/bias": np.zeros(5, np.float32)})
    assert info.value.code.name == "INVALID_ARGUMENT" and isinstance(info.value, ValueError)
    with pytest.raises(InvalidArgumentError, match="learning_rat"):
        admin.set_hyperparameters(learning_rat=0.1)
    assert admin.set_hyperparameters(learning_rate=0.25)["learning_rate"] == 0.25
    admin.delete_model()
    with pytest.raises(NotFoundError):
        admin.describe()
    with pytest.raises(ParamServeError):
        admin.pull()


def test_push_headers_kept_from_the_last_push_follow_a_new_shape_or_dtype(admin):
    """The SDK reuses a push's serialized headers while names, shapes and dtypes repeat; a
    gradient of another shape under the same name gets headers of its own (and the server's
    refusal), and the right one after it is applied, as is a float64 one (cast first)."""
    bias = ones("dense/bias")
    assert admin.push({"dense/bias": bias}).applied
    with pytest.raises(InvalidArgumentError, match="shape"):
        admin.push({"dense/bias": np.ones(bias.size + 1, np.float32)})
    version = admin.pull().version
    assert admin.push({"dense/bias": bias}).applied
    assert admin.push({"dense/bias": bias.astype(np.float64)}).applied
    assert admin.pull().version == version + 2


def test_sync_push_from_an_old_version_is_refused(start_server, connect):
    server = start_server(mode="sync", replicas=1)
    client = connect(server)
    client.create_model(initial_weights(), SGD)
    client.push({"dense/bias": ones("dense/bias")})  # version 0 -> 1
    with pytest.raises(FailedPreconditionError, match="pull and recompute"):
        client.push({"dense/bias": ones("dense/bias")})  # still based on version 0
    client.pull()
    assert client.push({"dense/bias": ones("dense/bias")}).version == 2


def test_calls_fail_fast_without_a_server_when_asked():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with Client(address, timeout_s=5, retry_max_attempts=2, wait_for_ready=False) as client:
        with pytest.raises(ParamServeError) as info:
            client.status()
        assert info.value.code.name == "UNAVAILABLE" and isinstance(info.value, ConnectionError)
    # By default too, a server never reached is not waited for: the cause comes at once
    # (tests/e2e/test_unreachable.py has every cause, and the wait_for_server_s option).
    with Client(address, timeout_s=60, wait_for_server_s=0) as client:
        with pytest.raises(ParamServeError) as info:
            client.status()
        assert info.value.code.name == "UNAVAILABLE" and info.value.attempts == 1
        assert f"cannot reach the paramserve server at {address}: connection refused" in str(
            info.value
        )


def test_push_is_retried_across_a_server_restart(start_server, tmp_path):
    """UNAVAILABLE is retried by gRPC (service config), and the restarted server, resumed
    from its exit snapshot, knows the worker's last sequence."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {
        "port": port,
        "checkpoint_dir": tmp_path / "checkpoints",
        "snapshot_on_exit": True,
        "resume": True,
    }
    first = start_server(mode="async", **options)
    with Client(first.address, worker_id="w", timeout_s=20) as client:
        client.create_model(initial_weights(), SGD)
        assert client.push({"dense/bias": ones("dense/bias")}).version == 1
        first.stop(grace_s=0)
        restart = threading.Timer(0.5, lambda: start_server(mode="async", **options))
        restart.start()
        result = client.push({"dense/bias": ones("dense/bias")})
        restart.join()
        assert (result.duplicate, result.version, result.sequence) == (False, 2, 2)


def test_restore_takes_a_snapshot_info_or_an_id_and_wrong_types_say_what_is_expected(
    start_server, connect, tmp_path
):
    server = start_server(mode="async", checkpoint_dir=tmp_path / "ckpt")
    client = connect(server)
    client.create_model(initial_weights(), SGD)
    info = client.snapshot()
    client.push({"dense/bias": ones("dense/bias")})
    restored = client.restore(info)  # what snapshot() returned
    assert restored.id == info.id and restored.version == 0 == client.status().version
    assert client.restore(info.id).version == 0
    client.download_snapshot(info, tmp_path / "copy.safetensors")
    with pytest.raises(TypeError, match="named by its id"):
        client.restore(42)
    with pytest.raises(TypeError, match="mapping"):
        client.push([ones("dense/bias")])
    with pytest.raises(TypeError, match="pass \\['dense/bias'\\]"):
        client.pull("dense/bias")
