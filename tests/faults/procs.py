"""Real processes for the fault tests: `paramserve serve` daemons and worker scripts.

Every wait is bounded; :class:`Processes` kills whatever is still running at teardown
(SIGCONT first, so a stopped process can die).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def clean_env() -> dict[str, str]:
    """The environment without PARAMSERVE_* settings, with the repo importable (tests.*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.01)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file (a torn last line of a killed writer is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def process_state(pid: int) -> str:
    """The one-letter state of a process from /proc (``T`` when stopped), ``?`` if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


class ServerProcess:
    """`python -m paramserve.server serve ...` with JSON logs read on a background thread.

    ``preamble``: Python code run in the server process before the CLI starts (a test hook,
    e.g. to hold the process at a chosen point); the CLI then runs exactly as with ``-m``.
    """

    def __init__(self, args: list[str], *, cwd: Path, preamble: str | None = None) -> None:
        command = [sys.executable, "-m", "paramserve.server", "serve", "--log-format", "json"]
        if preamble is not None:
            code = f"{preamble}\nimport sys\nfrom paramserve.server.cli import main\n"
            code += "sys.exit(main(sys.argv[1:]))\n"
            command = [sys.executable, "-c", code, "serve", "--log-format", "json"]
        self.args = args
        self.proc = subprocess.Popen(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=cwd,
        )
        self.messages: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = self.wait_for_message(r"listening on (\S+)", START_TIMEOUT_S).group(1)
        self.port = int(self.address.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                message = json.loads(line)["message"]
            except (ValueError, KeyError, TypeError):
                message = line.rstrip("\n")
            with self._changed:
                self.messages.append(message)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.messages[-60:])

    def wait_for_message(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first log message matching ``pattern``; fails if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for message in self.messages:
                    match = regex.search(message)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"server never logged {pattern!r} (exit {self.proc.poll()}):\n{self.log()}"
                    )
                self._changed.wait(min(left, 0.2))

    def kill(self) -> None:
        """``kill -9``: no drain, no final snapshot."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


class Processes:
    """Starts servers and worker scripts and guarantees they are gone at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._procs: list[subprocess.Popen] = []
        self._count = 0

    def server(self, *args: str | Path, preamble: str | None = None) -> ServerProcess:
        """A daemon on a free port (``--port 0`` unless ``args`` names one)."""
        argv = [str(a) for a in args]
        if "--port" not in argv:
            argv = ["--port", "0", *argv]
        server = ServerProcess(argv, cwd=self.directory, preamble=preamble)
        self._procs.append(server.proc)
        return server

    def refused_server(self, *args: str | Path) -> tuple[int, str]:
        """A daemon that must refuse to start: its exit status and stderr (fails if it serves)."""
        argv = [str(a) for a in args]
        if "--port" not in argv:
            argv = ["--port", "0", *argv]
        command = [sys.executable, "-m", "paramserve.server", "serve", "--log-format", "json"]
        proc = subprocess.Popen(
            [*command, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=self.directory,
        )
        self._procs.append(proc)
        try:
            _, stderr = proc.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            raise AssertionError(f"the server did not refuse to start:\n{stderr[-4000:]}") from None
        return proc.returncode, stderr

    def worker(self, function: str, **kwargs: Any) -> subprocess.Popen:
        """``tests.faults.workers.<function>(**kwargs)`` in a fresh Python process."""
        self._count += 1
        output = open(self.directory / f"worker-{self._count}.out", "wb")  # noqa: SIM115
        with output:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.workers", function, json.dumps(kwargs)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=clean_env(),
                cwd=REPO,
            )
        proc.output_path = output.name  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    @staticmethod
    def join(proc: subprocess.Popen, timeout_s: float) -> None:
        """Wait for a worker script; it must exit 0 (its output is shown if not)."""
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {proc.args[3:4]} still running after {timeout_s} s"
            ) from None
        if code != 0:
            output = Path(proc.output_path).read_text(errors="replace")  # type: ignore[attr-defined]
            raise AssertionError(f"worker exited with {code}:\n{output[-4000:]}")

    def cleanup(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


def iter_pushes(entries: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The ``push`` lines of a push log."""
    return (e for e in entries if e.get("event") == "push")
