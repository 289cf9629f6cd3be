"""The PyTorch adapter's tests: in-process servers on loopback port 0, async unless told,
through the suite's ``start_server`` and ``connect`` fixtures (tests/support)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def server_defaults(tmp_path: Path) -> dict[str, Any]:
    """Each server async, with its own checkpoint folder, no final snapshot, quiet logs."""
    return {
        "mode": "async",
        "checkpoint_dir": lambda index: tmp_path / f"checkpoints-{index}",
        "snapshot_on_exit": False,
        "log_level": "warning",
    }
