"""A `paramserve serve` daemon in a subprocess on a free loopback port, for the Keras tests.

Started through the command line (the interface the Keras adapter's users have), so these
tests depend on no server internals. Used by the tests and by the scripts they run in
subprocesses with another Keras backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PARAMSERVE_* settings, the repo importable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Daemon:
    """A running daemon: ``address``, and its log lines (for failure messages)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "paramserve.server", "serve", "--port", "0"]
        self.proc = subprocess.Popen(
            [*command, "--log-format", "json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.address = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(START_TIMEOUT_S) or not self.address:
            self.stop()
            raise RuntimeError("the daemon did not start:\n" + self.log())

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # drained to the end, so the daemon never blocks on it
            try:
                message = json.loads(line)["message"]
            except (ValueError, KeyError, TypeError):
                message = line.rstrip("\n")
            self.lines.append(message)
            match = re.search(r"listening on (\S+)", message)
            if match and not self.address:
                self.address = match.group(1)
                self._listening.set()
        self._listening.set()

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()


@contextlib.contextmanager
def daemon(*args: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """``with daemon("--mode", "sync", "--replicas", "1") as d: ... d.address``."""
    running = Daemon(list(args), env if env is not None else clean_env())
    try:
        yield running
    finally:
        running.stop()
