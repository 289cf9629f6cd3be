"""What a server should have computed, replayed locally with optim_core: the reduction of a
round, a local model, and a push log replayed against a fresh server."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from paramserve import optim_core
from paramserve.client import Client, SparseRows

from .processes import iter_pushes


def combine(pushes: Sequence[Mapping[str, Any]], *, reduction: str) -> dict[str, Any]:
    """The contract's reduction: per variable, left to right in the given (sorted worker
    id) order, in the variable dtype; sparse rows concatenate; mean divides by the count."""
    names = list(dict.fromkeys(n for push in pushes for n in push))
    out: dict[str, Any] = {}
    for name in names:
        parts = [push[name] for push in pushes if name in push]
        if isinstance(parts[0], SparseRows):
            value: Any = SparseRows(
                np.concatenate([p.indices for p in parts]),
                np.concatenate([p.values for p in parts]),
            )
        else:
            value = parts[0]
            for part in parts[1:]:
                value = value + part
        if reduction == "mean" and len(pushes) > 1:
            n = np.float32(len(pushes))
            value = (
                SparseRows(value.indices, value.values / n)
                if isinstance(value, SparseRows)
                else value / n
            )
        out[name] = value
    return out


class LocalModel:
    """Variables named like the server's, and an optimizer from anything ``optim_core.get``
    takes (a name, the server's config dict, an instance)."""

    def __init__(self, weights: Mapping[str, np.ndarray], optimizer: Any) -> None:
        self.variables = {
            n: optim_core.Variable(np.array(w, copy=True), path=n) for n, w in weights.items()
        }
        self.optimizer = optim_core.get(optimizer)
        self.optimizer.build(list(self.variables.values()))

    def weights(self) -> dict[str, np.ndarray]:
        return {n: v.numpy() for n, v in self.variables.items()}

    def apply(self, grads: Mapping[str, Any]) -> None:
        """One optimizer step; SDK sparse rows become optim_core IndexedSlices."""
        values = [
            optim_core.IndexedSlices(g.indices, g.values) if isinstance(g, SparseRows) else g
            for g in grads.values()
        ]
        self.optimizer.apply(values, [self.variables[n] for n in grads])


class LocalReplay(LocalModel):
    """:class:`LocalModel` as the server-core tests spell it: optimizer first, ``opt``."""

    def __init__(self, optimizer: Any, variables: Mapping[str, np.ndarray]) -> None:
        super().__init__(variables, optimizer)

    @property
    def opt(self) -> optim_core.Optimizer:
        return self.optimizer


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
