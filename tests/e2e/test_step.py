"""The Step RPC (push + pull in one round trip) against real servers: same results as push then
pull, bit for bit; exactly once; validation before any change; rows; RemoteOptimizer's choice;
``applied`` on duplicates and skipped non-finite pushes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RemoteOptimizer,
    SparseRows,
)
from tests.support.asserts import assert_same
from tests.support.models.embedding import SHAPES, initial_weights, known_gradients
from tests.support.replay import LocalModel, combine

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
WORKERS = ("worker-c", "worker-a", "worker-b")  # not in sorted order


def model_client(start_server, connect, *, worker_id: str = "w", **server_options) -> Client:
    server_options.setdefault("mode", "async")
    client = connect(start_server(**server_options), worker_id=worker_id)
    client.create_model(initial_weights(), ADAM)
    return client


def state(client: Client) -> tuple[int, dict[str, np.ndarray], int]:
    """Version, weights and the client's worker's last sequence on the server."""
    weights = client.pull()
    worker = client.status().worker(client.worker_id)
    return weights.version, dict(weights), worker.last_sequence if worker else 0


def assert_unchanged(client: Client, before: tuple[int, dict[str, np.ndarray], int]) -> None:
    version, weights, last_sequence = state(client)
    assert (version, last_sequence) == (before[0], before[2])
    assert_same(weights, before[1])


def test_step_equals_push_then_pull_bit_for_bit(start_server, connect):
    by_push = model_client(start_server, connect)
    by_step = model_client(start_server, connect)
    pulled, stepped = by_push.pull(), by_step.pull()
    for i in range(5):
        grads = known_gradients("w", i, pulled)  # dense and sparse rows
        result = by_push.push(grads)
        pulled = by_push.pull()
        stepped = by_step.step(known_gradients("w", i, stepped))
        assert stepped.version == pulled.version == result.version == i + 1
        assert stepped.push_result == result  # duplicate, version, contributors, seq, applied
        assert by_step.base_version == i + 1
        assert_same(stepped, pulled)
        assert all(a.flags.writeable for a in stepped.values())
    assert_same(by_step.optimizer_state(), by_push.optimizer_state())


def test_sync_rounds_through_step_equal_local_replay(start_server, connect):
    server = start_server(mode="sync", replicas=3)
    admin = connect(server)
    admin.create_model(initial_weights(), ADAM)
    steps = 3
    results: dict[str, list] = {w: [] for w in WORKERS}
    errors: list[BaseException] = []

    def work(worker_id: str) -> None:
        try:
            with Client(server.address, worker_id=worker_id, timeout_s=30) as client:
                weights = client.pull()
                for step in range(steps):
                    # One worker mixes in plain pushes: both share the round and dedupe table.
                    grads = known_gradients(worker_id, step, weights)
                    if worker_id == "worker-b" and step == 1:
                        client.push(grads)
                        weights = client.pull()
                    else:
                        weights = client.step(grads)
                    results[worker_id].append(weights)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in WORKERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors

    model = LocalModel(initial_weights(), admin.describe().optimizer)
    for step in range(steps):
        weights = model.weights()
        model.apply(
            combine([known_gradients(w, step, weights) for w in sorted(WORKERS)], reduction="sum")
        )
        for worker_id in WORKERS:
            got = results[worker_id][step]
            assert got.version == step + 1
            assert_same(got, model.weights())
            if got.push_result is not None:
                assert got.push_result.contributors == 3 and got.push_result.applied
    assert admin.status().rounds_completed == steps


def test_duplicate_steps_are_acknowledged_not_reapplied(start_server, connect):
    client = model_client(start_server, connect)
    grads = known_gradients("w", 0, initial_weights())
    first = client.step(grads)
    assert (first.push_result.duplicate, first.push_result.applied) == (False, True)

    again = client.step(grads, sequence=first.push_result.sequence)  # e.g. a lost reply
    assert again.push_result.duplicate and not again.push_result.applied
    assert again.version == 1 and again.push_result.version == 1
    assert_same(again, first)

    # Step and Push share the dedupe table, both ways.
    pushed = client.push(grads, sequence=first.push_result.sequence)
    assert pushed.duplicate and not pushed.applied
    later = client.push(grads)
    stepped = client.step(grads, sequence=later.sequence)
    assert stepped.push_result.duplicate and stepped.version == 2
    assert client.status().version == 2


def test_invalid_steps_change_nothing(start_server, connect):
    client = model_client(start_server, connect)
    client.step(known_gradients("w", 0, initial_weights()))
    before = state(client)
    bias = np.ones(SHAPES["dense/bias"], np.float32)
    bad = [
        (NotFoundError, "nope", {"grads": {"nope": bias}}),
        (InvalidArgumentError, "shape", {"grads": {"dense/bias": np.ones(4, np.float32)}}),
        # Refused by the SDK before sending (float gradients of another dtype are cast).
        (TypeError, "int32", {"grads": {"dense/bias": bias.astype(np.int32)}}),
        (InvalidArgumentError, "NaN", {"grads": {"dense/bias": bias * np.nan}}),
        # The reply's selection is checked before the push is applied.
        (NotFoundError, "nope", {"grads": {"dense/bias": bias}, "names": ["nope"]}),
        (InvalidArgumentError, "rows", {"grads": {"dense/bias": bias}, "rows": {"embedding": [8]}}),
    ]
    for error, match, call in bad:
        grads = call.pop("grads")
        with pytest.raises(error, match=match):
            client.step(grads, **call)
        assert_unchanged(client, before)
    # The client's sequence moved on, the server's did not: the next step is applied.
    assert client.step({"dense/bias": bias}).push_result.applied


def test_sync_step_from_an_old_version_is_refused(start_server, connect):
    client = model_client(start_server, connect, mode="sync", replicas=1)
    bias = {"dense/bias": np.ones(SHAPES["dense/bias"], np.float32)}
    assert client.step(bias).version == 1
    before = state(client)
    with pytest.raises(FailedPreconditionError, match="pull and recompute"):
        client.step(bias, base_version=0)
    assert_unchanged(client, before)
    assert client.step(bias).version == 2  # base_version follows the last step's reply


def test_step_rows_and_names(start_server, connect):
    client = model_client(start_server, connect)
    grads = {"embedding": SparseRows(np.array([1, 1, 6]), np.ones((3, 4), np.float32))}
    picked = client.step(grads, rows={"embedding": [6, 1, 0]})
    assert list(picked) == ["embedding"] and picked.version == 1
    rows = picked["embedding"]
    assert isinstance(rows, SparseRows) and rows.indices.tolist() == [6, 1, 0]
    full = client.pull(["embedding"])["embedding"]
    assert_same({"r": rows.values}, {"r": full[[6, 1, 0]]})

    both = client.step(
        {"dense/bias": np.ones(3, np.float32)}, names=["dense/bias"], rows={"embedding": [2]}
    )
    assert list(both) == ["dense/bias", "embedding"] and both.version == 2
    assert_same({"b": both["dense/bias"]}, {"b": client.pull(["dense/bias"])["dense/bias"]})


def test_step_that_does_not_fit_one_message_is_refused_before_sending(start_server, connect):
    server = start_server(mode="async")
    client = connect(server, chunk_bytes=64 << 10, max_message_bytes=1 << 20)
    big = {"big": np.zeros(1 << 18, np.float32), "small": np.zeros(4, np.float32)}  # 1 MiB
    client.create_model(big, "sgd")
    with pytest.raises(ValueError, match=r"push\(\) and\s+pull\(\)"):
        client.step({"big": np.ones(1 << 18, np.float32)}, names=["small"])  # too big to send
    with pytest.raises(ValueError, match="max_message_bytes"):
        client.step({"small": np.ones(4, np.float32)})  # the reply would be too big
    assert client.last_sequence == 0 and client.status().version == 0
    assert client.step({"small": np.ones(4, np.float32)}, names=["small"]).version == 1


def test_applied_is_false_for_skipped_nonfinite_pushes(start_server, connect):
    client = model_client(start_server, connect, nonfinite="skip")
    bias = np.ones(SHAPES["dense/bias"], np.float32)
    nan = bias * np.nan
    skipped = client.push({"dense/bias": nan})
    assert (skipped.duplicate, skipped.applied, skipped.version) == (False, False, 0)
    stepped = client.step({"dense/bias": nan})
    assert not stepped.push_result.applied and not stepped.push_result.duplicate
    assert stepped.version == 0
    assert_same(stepped, initial_weights())
    assert client.status().worker("w").last_sequence == 2  # skipped pushes took effect
    assert client.push({"dense/bias": bias}).applied
    assert client.step({"dense/bias": bias}).push_result.applied


def record_calls(client: Client, monkeypatch) -> list[str]:
    """The names of the client's ``step``/``push`` calls, in order."""
    used: list[str] = []
    for method in ("step", "push"):
        original = getattr(client, method)

        def recorded(*args, _original=original, _method=method, **kwargs):
            used.append(_method)
            return _original(*args, **kwargs)

        monkeypatch.setattr(client, method, recorded)
    return used


@pytest.mark.parametrize("step_max_bytes, expect", [(1 << 20, "step"), (0, "push")])
def test_remote_optimizer_uses_step_for_small_models(
    start_server, connect, monkeypatch, step_max_bytes, expect
):
    client = model_client(start_server, connect, mode="sync", replicas=1)
    used = record_calls(client, monkeypatch)
    remote = RemoteOptimizer(client, step_max_bytes=step_max_bytes)
    params = [w.copy() for w in initial_weights().values()]
    local_vars = [optim_core.Variable(w.copy(), path=n) for n, w in initial_weights().items()]
    local = optim_core.deserialize(ADAM)
    local.build(local_vars)
    for step in range(3):
        grads = [np.full_like(p, 0.1 * (step + 1)) for p in params]
        assert remote.apply(grads, params) == step + 1
        local.apply([np.full_like(v.value, 0.1 * (step + 1)) for v in local_vars], local_vars)
    for p, v in zip(params, local_vars, strict=True):
        assert p.tobytes() == v.value.tobytes()
    assert used == [expect] * 3


def test_remote_optimizer_switches_to_push_and_pull_above_the_limit(
    start_server, connect, monkeypatch
):
    client = model_client(start_server, connect)
    used = record_calls(client, monkeypatch)
    remote = RemoteOptimizer(client, step_max_bytes=64)  # dense/kernel is 60 bytes, embedding 128
    params = list(initial_weights().values())
    remote.build(params)
    remote.apply([np.ones_like(params[0])], [params[0]])  # 60 bytes each way: one Step
    remote.apply([np.ones_like(params[2])], [params[2]])  # 128 bytes: push + pull
    assert used == ["step", "push"]
    assert_same(dict(zip(SHAPES, params, strict=True)), dict(client.pull()))
    with pytest.raises(ValueError, match="step_max_bytes"):
        RemoteOptimizer(client, step_max_bytes=-1)


def test_step_headers_are_checked_again_against_a_new_model(start_server, connect):
    # The server remembers header lists that passed, per model: a model recreated with
    # another shape must refuse the very headers the old one accepted.
    server = start_server(mode="async")
    admin = connect(server, worker_id="admin")
    worker = connect(server, worker_id="w")
    admin.create_model(initial_weights(), ADAM)
    bias = {"dense/bias": np.ones(SHAPES["dense/bias"], np.float32)}
    assert worker.step(bias).push_result.applied
    admin.delete_model()
    admin.create_model({"dense/bias": np.zeros(4, np.float32)}, ADAM)
    with pytest.raises(InvalidArgumentError, match="shape"):
        worker.step(bias)
    new_bias = {"dense/bias": np.ones(4, np.float32)}
    assert worker.step(new_bias, base_version=0).push_result.applied
