"""GetStatus's per-worker base version and duplicates, and the server's payload bytes."""

from __future__ import annotations

import json

from tests.support.models.tiny import SGD_JSON, grads_for, initial_variables

PUSH_BYTES = 6 * 4 + 2 * 4  # the two float32 gradients of grads_for()


def test_status_counts_worker_base_versions_duplicates_and_payload_bytes(start_server, connect):
    server = start_server(mode="async")
    a = connect(server, worker_id="a")
    b = connect(server, worker_id="b")
    a.create_model(initial_variables(), json.loads(SGD_JSON))
    assert a.push(grads_for()).version == 1  # computed from version 0
    a.pull()
    a.push(grads_for())  # from version 1
    assert a.push(grads_for(), sequence=a.last_sequence).duplicate  # a resend
    b.push(grads_for(), base_version=0)  # version 3 now, b computed from 0

    status = a.status()
    assert status.version == 3
    assert (status.worker("a").last_base_version, status.worker("a").duplicates) == (1, 1)
    assert (status.worker("b").last_base_version, status.worker("b").duplicates) == (0, 0)
    # In: the model and four pushes (the resend too); out: one pull of both variables.
    assert status.received_bytes == PUSH_BYTES + 4 * PUSH_BYTES
    assert status.sent_bytes == PUSH_BYTES


def test_sync_workers_base_version_is_their_rounds(start_server, connect):
    server = start_server(mode="sync", replicas=1)
    client = connect(server, worker_id="w")
    client.create_model(initial_variables(), json.loads(SGD_JSON))
    for _ in range(3):
        client.pull()
        client.push(grads_for())
    worker = client.status().worker("w")
    assert (worker.pushes, worker.last_base_version, worker.duplicates) == (3, 2, 0)
