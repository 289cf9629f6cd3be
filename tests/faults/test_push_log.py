"""The opt-in push log (``--push-log``): one JSON line per push that took effect, in order."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from paramserve.server.aggregator import AggregationConfig, Aggregator
from paramserve.server.cli import build_parser, config_from_args
from paramserve.server.config import load_config
from paramserve.server.errors import Unavailable
from paramserve.server.push_log import PushLog
from paramserve.server.store import ModelStore

VARIABLES = {"w": np.zeros(3, np.float32)}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _make(path: Path, *, nonfinite: str = "reject", **config) -> Aggregator:
    store = ModelStore(nonfinite=nonfinite)
    store.create_model("m", "sgd", VARIABLES)
    return Aggregator(store, AggregationConfig(**config), push_log=PushLog(path))


def _grads(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full(3, value, np.float32)}


def test_async_pushes_duplicates_skips_and_restores(tmp_path: Path):
    path = tmp_path / "push.jsonl"
    agg = _make(path, mode="async", nonfinite="skip")
    agg.push("b", 1, 0, _grads())
    agg.push("a", 7, 0, _grads())
    assert agg.push("a", 7, 0, _grads()).duplicate  # a resend: acknowledged, not logged
    agg.push("a", 8, 0, _grads(np.nan))  # skipped as non-finite: recorded, not applied
    state = agg.export_state()
    agg.import_state(state)
    agg.close()  # closes the log too; later pushes are refused
    with pytest.raises(Unavailable):
        agg.push("a", 9, 0, _grads())
    assert _lines(path) == [
        {"event": "push", "worker_id": "b", "sequence": 1, "version": 1, "applied": True},
        {"event": "push", "worker_id": "a", "sequence": 7, "version": 2, "applied": True},
        {"event": "push", "worker_id": "a", "sequence": 8, "version": 2, "applied": False},
        {"event": "restore", "version": 2},
    ]


def test_sync_round_is_logged_in_worker_id_order_with_its_version(tmp_path: Path):
    path = tmp_path / "push.jsonl"
    agg = _make(path, mode="sync", replicas=3, round_timeout_s=30.0)
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(agg.push, w, s, 0, _grads()) for w, s in (("c", 5), ("a", 2), ("b", 9))
        ]
        assert [f.result(timeout=30).version for f in futures] == [1, 1, 1]
    assert [(e["worker_id"], e["sequence"], e["version"]) for e in _lines(path)] == [
        ("a", 2, 1),
        ("b", 9, 1),
        ("c", 5, 1),
    ]


def test_appends_across_restarts_and_is_set_by_flag_env_or_toml(tmp_path: Path):
    path = tmp_path / "push.jsonl"
    for sequence in (1, 2):
        agg = _make(path, mode="async")
        agg.push("w", sequence, 0, _grads())
        agg.close()
    assert [e["sequence"] for e in _lines(path)] == [1, 2]

    args = build_parser().parse_args(["serve", "--push-log", str(path)])
    assert config_from_args(args, env={}).push_log == path
    assert load_config(env={"PARAMSERVE_PUSH_LOG": str(path)}).push_log == path
    toml = tmp_path / "server.toml"
    toml.write_text(f'push_log = "{path}"\n')
    assert load_config(config_file=toml, env={}).push_log == path
    assert load_config(env={}).push_log is None


def test_an_unopenable_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(OSError, match="cannot open the push log"):
        PushLog(tmp_path / "missing-dir" / "push.jsonl")
