"""Fixtures for end-to-end tests: real servers on loopback port 0, spawned worker processes."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def server_defaults(tmp_path: Path) -> dict[str, Any]:
    """Each server with its own checkpoint folder, no final snapshot, quiet logs."""
    return {
        "checkpoint_dir": lambda index: tmp_path / f"checkpoints-{index}",
        "snapshot_on_exit": False,
        "log_level": "warning",
    }


@pytest.fixture(scope="session")
def worker_pool() -> Iterator[ProcessPoolExecutor]:
    """Three spawned worker processes shared by the suite (spawning costs ~1 s each)."""
    with ProcessPoolExecutor(max_workers=3, mp_context=mp.get_context("spawn")) as pool:
        yield pool
