"""The Keras tests' daemon: a `paramserve serve` subprocess on a free loopback port.

Started through the command line (the interface the Keras adapter's users have), so these
tests depend on no server internals; used by the tests and by the scenario scripts they run
in subprocesses with another Keras backend. The process itself is tests.support's
:class:`~tests.support.processes.ServerProcess`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import REPO, ServerProcess, clean_env

__all__ = ["REPO", "Daemon", "clean_env", "daemon"]

Daemon = ServerProcess


@contextlib.contextmanager
def daemon(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """``with daemon("--mode", "sync", "--replicas", "1") as d: ... d.address``; the daemon
    runs in a temporary working folder and is stopped (SIGTERM, then killed) on exit."""
    with tempfile.TemporaryDirectory(prefix="paramserve-keras-") as folder:
        running = ServerProcess(list(args), cwd=Path(folder), env=env)
        try:
            yield running
        finally:
            running.stop(timeout_s=30)  # killed, and the test fails, if it hangs
