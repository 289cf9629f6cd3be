"""Fixtures of the fault tests: real daemons and worker processes, always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .procs import Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Start servers (``procs.server(*flags)``) and workers; all are killed at teardown."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()
