"""Pushes are never silently dropped: sequences, sessions, base versions, and create_model.

A push whose (worker_id, sequence) the server has seen from the same client is a duplicate
(acknowledged, not applied again). Anything else at or below the worker's last sequence used
to be a "duplicate" too, so a restarted worker that counted from 1 again lost every push
without an error; now it is FAILED_PRECONDITION naming the last sequence, and the SDK's
automatic numbering resynchronises by itself. Gradients from a version the server never
had, or a negative one, are refused in every mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from paramserve.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
)
from tests.support.asserts import assert_same
from tests.support.models.embedding import initial_weights

SGD = {"class_name": "SGD", "config": {"learning_rate": 0.5}}


def bias(value: float) -> dict[str, np.ndarray]:
    return {"dense/bias": np.full(3, value, np.float32)}


@pytest.fixture(params=["async", "stale", "sync"])
def server(request, start_server):
    return start_server(mode=request.param, replicas=1)


@pytest.fixture
def admin(server, connect) -> Client:
    client = connect(server)
    client.create_model(initial_weights(), SGD)
    return client


def test_a_restarted_worker_counting_from_one_is_refused_naming_the_last_sequence(
    server, admin, connect
):
    before = connect(server, worker_id="w")
    for _ in range(3):
        before.push(bias(1.0), base_version=admin.status().version)
    weights = admin.pull()
    restarted = connect(server, worker_id="w")  # a new process: a new session
    for sequence in (1, 3):
        with pytest.raises(FailedPreconditionError, match="pushed up to sequence 3") as info:
            restarted.push(bias(7.0), sequence=sequence, base_version=weights.version)
        assert "Continue from sequence 4" in str(info.value)
    assert_same(admin.pull(), weights)
    assert admin.status().worker("w").last_sequence == 3
    # Its own resend is still a duplicate.
    again = before.push(bias(1.0), sequence=3, base_version=weights.version)
    assert again.duplicate and not again.applied
    assert_same(admin.pull(), weights)


def test_the_sdk_resynchronises_an_automatic_sequence_taken_by_another_client(
    server, admin, connect
):
    a = connect(server, worker_id="shared")
    b = connect(server, worker_id="shared")
    assert b.push(bias(1.0), base_version=0).sequence == 1  # b reads last_sequence 0 first
    assert a.push(bias(1.0), base_version=1).sequence == 2  # a reads last_sequence 1 first
    assert a.push(bias(1.0), base_version=2).sequence == 3
    # b's counter says 2, which a used: refused, resynchronised, sent as 4 and applied.
    result = b.push(bias(1.0), base_version=3)
    assert (result.sequence, result.duplicate, result.applied) == (4, False, True)
    assert admin.status().version == 4
    assert admin.status().worker("shared").pushes == 4


def test_out_of_order_pushes_of_one_client_are_applied_once(server, admin, connect):
    if server.config.aggregation.mode == "sync":
        pytest.skip("a sync round takes one push per worker")
    client = connect(server, worker_id="threads")
    client.push(bias(1.0), sequence=5)
    late = client.push(bias(2.0), sequence=3)  # sent before 5, arrived after it
    assert late.applied and not late.duplicate
    assert admin.status().version == 2
    assert client.push(bias(2.0), sequence=3).duplicate
    assert admin.status().version == 2
    other = connect(server, worker_id="threads")
    with pytest.raises(FailedPreconditionError, match="never took effect"):
        other.push(bias(2.0), sequence=4)
    with pytest.raises(FailedPreconditionError, match="already used by another client"):
        other.push(bias(2.0), sequence=3)


def test_a_sequence_far_below_the_last_one_is_refused_even_from_the_same_client(
    server, admin, connect
):
    if server.config.aggregation.mode == "sync":
        pytest.skip("a sync round takes one push per worker")
    client = connect(server, worker_id="far")
    client.push(bias(1.0), sequence=5000)
    with pytest.raises(FailedPreconditionError, match="more than 1024 below"):
        client.push(bias(1.0), sequence=10)
    assert admin.status().version == 1


def test_base_versions_the_server_never_had_are_refused_in_every_mode(server, admin, connect):
    client = connect(server, worker_id="versions")
    weights = admin.pull()
    if server.config.aggregation.mode == "sync":
        match = "computed from version 5; the open round is for version 0"
    else:
        match = "computed from version 5, but the model is at version 0"
    with pytest.raises(FailedPreconditionError, match=match):
        client.push(bias(1.0), base_version=5)
    with pytest.raises(InvalidArgumentError, match="base_version must be >= 0"):
        client.push(bias(1.0), base_version=-1)
    assert_same(admin.pull(), weights)
    # The refused pushes consumed no sequence on the server: the next one is applied.
    assert client.push(bias(1.0), base_version=0).applied


def test_create_model_reports_other_initial_values_and_the_sdk_warns(server, admin, connect):
    second = connect(server)
    assert second.create_model(initial_weights(), SGD).values_match  # same values: silent
    with pytest.warns(UserWarning, match="other weights than the values passed"):
        result = second.create_model(initial_weights(seed=1), SGD)
    assert (result.created, result.values_match) == (False, False)
    admin.push(bias(1.0))
    with pytest.warns(UserWarning, match="pull\\(\\) them before computing gradients"):
        assert not second.create_model(initial_weights(), SGD).values_match  # it trained
