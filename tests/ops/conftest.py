"""Real `python -m paramserve.server serve` processes on loopback, read through their JSON logs."""

from __future__ import annotations

import json
import os
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
import pytest
from prometheus_client.parser import text_string_to_metric_families

from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc

START_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``{'name{label="value",...}': value}`` (labels sorted)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PARAMSERVE_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVE_")}
    env.update(extra)
    return env


class ServerProcess:
    """One server subprocess; its stderr is collected line by line (``lines``, ``events``)."""

    def __init__(self, args: list[str], *, cwd: Path, log_format: str = "json") -> None:
        command = [sys.executable, "-m", "paramserve.server", "serve", "--port", "0"]
        command += ["--log-format", log_format, *args]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = ""
        self.metrics_port: int | None = None
        if log_format == "json":
            listening = self.wait_for_event("listening", timeout_s=START_TIMEOUT_S)
            self.address = listening["address"]
            self.metrics_port = listening.get("metrics_port")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def events(self) -> list[dict[str, Any]]:
        """The stderr lines parsed as JSON (those that are JSON objects)."""
        out = []
        for line in list(self.lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """The first log entry matching ``predicate``, waiting for it to be written."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for entry in self.events:
                    if predicate(entry):
                        return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError("no such log entry; stderr:\n" + self.stderr)
                self._changed.wait(min(remaining, 0.5))

    def wait_for_event(self, event: str, *, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == event, timeout_s=timeout_s)

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self, channel: grpc.Channel) -> pb_grpc.ParameterServerStub:
        return pb_grpc.ParameterServerStub(channel)

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
        """SIGTERM and wait: the orderly shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``start_process(*flags)``: a running server subprocess, killed after the test if alive."""
    processes: list[ServerProcess] = []

    def start(*args: str, log_format: str = "json") -> ServerProcess:
        process = ServerProcess(list(args), cwd=tmp_path, log_format=log_format)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
