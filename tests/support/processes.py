"""Real processes: `paramserve serve` daemons read through their logs, and worker scripts.

Every wait is bounded; :class:`Processes` kills whatever is still running at teardown
(SIGCONT first, so a stopped process can die).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PARAMSERVE_* settings, with the repo importable
    (``tests.*``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback port that was free a moment ago (for flags that cannot take 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``{'name{label="value",...}': value}`` (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file (a torn last line of a killed writer is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def iter_pushes(entries: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The ``push`` lines of a push log."""
    return (e for e in entries if e.get("event") == "push")


def process_state(pid: int) -> str:
    """The one-letter state of a process from /proc (``T`` when stopped), ``?`` if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


def _with_port_0(args: list[str]) -> list[str]:
    return args if "--port" in args else ["--port", "0", *args]


class ServerProcess:
    """`python -m paramserve.server serve ...` (on port 0 unless ``args`` name a port), its
    stderr read line by line on a background thread.

    With the JSON log format (the default), the constructor waits for the "listening" entry
    and sets ``address``, ``port`` and ``metrics_port``. ``preamble``: Python code run in the
    server process before the CLI starts (a test hook, e.g. to make it die at a chosen
    point); the CLI then runs exactly as with ``-m``. ``env``: the whole environment
    (default: :func:`clean_env`). ``wait=False`` returns at once (start several, then
    :meth:`wait_listening` on each).
    """

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path,
        log_format: str = "json",
        preamble: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        command = [sys.executable, "-m", "paramserve.server"]
        if preamble is not None:
            code = f"{preamble}\nimport sys\nfrom paramserve.server.cli import main\n"
            code += "sys.exit(main(sys.argv[1:]))\n"
            command = [sys.executable, "-c", code]
        self.args = _with_port_0(list(args))
        self.proc = subprocess.Popen(
            [*command, "serve", "--log-format", log_format, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else clean_env(),
            cwd=cwd,
        )
        self.lines: list[str] = []
        # Each line parsed once: the JSON object, or None for any other line.
        self._entries: list[dict[str, Any] | None] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""
        self.port = 0
        self.metrics_port: int | None = None
        if log_format == "json" and wait:
            self.wait_listening()

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for the "listening" log entry (JSON log format) and set ``address``, ``port``
        and ``metrics_port`` from it; fails if the process exits first."""
        listening = self.wait_for_event("listening", timeout_s=timeout_s)
        self.address = listening["address"]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.metrics_port = listening.get("metrics_port")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.rstrip("\n")
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            with self._changed:
                self.lines.append(line)
                self._entries.append(entry if isinstance(entry, dict) else None)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    # -- the log ---------------------------------------------------------------------------

    @property
    def events(self) -> list[dict[str, Any]]:
        """The stderr lines that are JSON objects, parsed."""
        with self._changed:
            return [e for e in self._entries if e is not None]

    @property
    def messages(self) -> list[str]:
        """Each line's log message (the whole line where it is not a JSON log entry)."""
        with self._changed:
            return [_message(line, e) for line, e in zip(self.lines, self._entries, strict=True)]

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def log(self) -> str:
        """The last 60 messages (for failure reports)."""
        return "\n".join(self.messages[-60:])

    def _wait(self, find: Callable[[], Any], timeout_s: float, failure: Callable[[], str]) -> Any:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = find()
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(failure())
                self._changed.wait(min(left, 0.2))

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """The first log entry matching ``predicate``, waiting for it to be written; fails if
        the process exits first."""
        return self._wait(
            lambda: next((e for e in self.events if predicate(e)), None),
            timeout_s,
            lambda: "no such log entry; stderr:\n" + self.stderr,
        )

    def wait_for_event(self, event: str, *, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == event, timeout_s=timeout_s)

    def wait_for_message(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first log message matching ``pattern``; fails if the process exits first."""
        regex = re.compile(pattern)
        return self._wait(
            lambda: next(filter(None, map(regex.search, self.messages)), None),
            timeout_s,
            lambda: f"server never logged {pattern!r} (exit {self.proc.poll()}):\n{self.log()}",
        )

    # -- talking to it ---------------------------------------------------------------------

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self, channel: grpc.Channel) -> pb_grpc.ParameterServerStub:
        return pb_grpc.ParameterServerStub(channel)

    # -- ending it -------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """The exit status; the process is killed (and the test fails) after ``timeout_s``."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout_s} s:\n{self.stderr}") from None
        self._reader.join(timeout=5)
        return code

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit status: the orderly shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    terminate = stop

    def kill(self) -> None:
        """``kill -9``: no drain, no final snapshot."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def _message(line: str, entry: dict[str, Any] | None) -> str:
    if entry is not None and isinstance(entry.get("message"), str):
        return entry["message"]
    return line


class Processes:
    """Starts servers and worker scripts in ``directory`` and guarantees they are gone at
    teardown (:meth:`cleanup`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._procs: list[subprocess.Popen] = []
        self._count = 0

    def server(
        self, *args: str | Path, preamble: str | None = None, log_format: str = "json"
    ) -> ServerProcess:
        """A daemon on a free port (``--port 0`` unless ``args`` names one)."""
        argv = [str(a) for a in args]
        server = ServerProcess(argv, cwd=self.directory, log_format=log_format, preamble=preamble)
        self._procs.append(server.proc)
        return server

    def refused_server(self, *args: str | Path) -> tuple[int, str]:
        """A daemon that must refuse to start: its exit status and stderr (fails if it serves)."""
        argv = _with_port_0([str(a) for a in args])
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
        """``tests.support.workers.<function>(**kwargs)`` in a fresh Python process, its output
        in a file of ``directory``."""
        self._count += 1
        output = open(self.directory / f"worker-{self._count}.out", "wb")  # noqa: SIM115
        with output:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.workers", function, json.dumps(kwargs)],
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
