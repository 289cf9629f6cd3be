"""Replays of a server's push log: against a fresh server, and locally with optim_core."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from paramserve.client import Client

from ..e2e.replay import LocalModel, assert_same, combine
from .procs import iter_pushes

__all__ = ["LocalModel", "assert_same", "combine", "local_model_of", "rounds", "sync_replay"]


def local_model_of(client: Client) -> LocalModel:
    """A local optim_core copy of a server's model: weights, optimizer config and state."""
    model = LocalModel(client.pull(), client.describe().optimizer)
    model.optimizer.load_state_dict(dict(client.optimizer_state()))
    return model


def rounds(entries: list[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """Push-log lines grouped by the version they produced, in log order."""
    pushes = list(iter_pushes(entries))
    grouped = itertools.groupby(pushes, key=lambda e: e["version"])
    return [(version, list(group)) for version, group in grouped]


def sync_replay(
    address: str,
    log_rounds: list[tuple[int, list[dict[str, Any]]]],
    gradients: Callable[[str, int, dict[str, np.ndarray]], dict[str, np.ndarray]],
    model: LocalModel,
) -> None:
    """Push every logged round again, concurrently with the same ids and sequences, into
    a sync server (and apply it to ``model``): each round must close at its logged version."""
    worker_ids = sorted({e["worker_id"] for _, entries in log_rounds for e in entries})
    clients = {w: Client(address, worker_id=w, timeout_s=30.0) for w in worker_ids}
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            for version, entries in log_rounds:
                base = clients[worker_ids[0]].pull()
                assert base.version == version - 1, (base.version, version)
                local = model.weights()
                pushes = [
                    (e["worker_id"], e["sequence"], gradients(e["worker_id"], e["sequence"], base))
                    for e in entries
                ]
                futures = [
                    pool.submit(clients[w].push, g, base_version=version - 1, sequence=s)
                    for w, s, g in pushes
                ]
                for future in futures:
                    result = future.result(timeout=60)
                    assert (result.version, result.duplicate) == (version, False), result
                model.apply(
                    combine([gradients(w, s, local) for w, s, _ in pushes], reduction="sum")
                )
    finally:
        for client in clients.values():
            client.close()
