"""``paramserve top`` against real servers: one frame with ``--once``, and a live view under a
pseudo-terminal that refreshes and quits on ``q`` or Ctrl-C.

Nothing here depends on the clock: the live test waits (with a generous bound) for content
that only a later frame can show, then for the process to exit.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from tests.cli.test_import_cost import heavy_in, run_cli
from tests.support.credentials import ADMIN_TOKEN, WORKER_TOKEN, write_tokens_file
from tests.support.models.tiny import SGD_JSON, grads_for, initial_variables
from tests.support.processes import REPO, clean_env, free_port

BOUND_S = 120  # generous: a busy machine only makes this slower, never wrong
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def cells(output: str, first: str) -> list[list[str]]:
    """The table rows (cells stripped) whose first cell is ``first``."""
    rows = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) > 2 and parts[1] == first:
            rows.append(parts[1:-1])
    return rows


def train(start_server, connect, tmp_path):
    """An async server with a snapshot and two workers: ``a`` pushed 3 times (the last one
    from version 2) and once more as a resend, ``b`` once from version 0; version 4."""
    server = start_server(mode="async", checkpoint_dir=tmp_path / "ckpt")
    a = connect(server, worker_id="worker-a")
    a.create_model(initial_variables(), json.loads(SGD_JSON))
    for _ in range(3):
        a.pull()
        a.push(grads_for())
    assert a.push(grads_for(), sequence=a.last_sequence).duplicate
    b = connect(server, worker_id="worker-b")
    assert b.push(grads_for(), base_version=0).version == 4
    a.snapshot()
    return server


def test_once_prints_servers_and_workers(start_server, connect, tmp_path):
    server = train(start_server, connect, tmp_path)
    down = f"127.0.0.1:{free_port()}"
    proc, modules = run_cli("top", "--once", "--interval", "0.05", server.address, down)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2/2 servers up" not in out and "1/2 servers up" in out
    [row] = cells(out, server.address)[:1]
    # server, state, mode, model, version, ...; the last column is the snapshot's age.
    assert row[1:5] == ["serving", "async", "model (8 params)", "4"]
    assert row[-1].endswith("ago")
    [unreachable] = cells(out, down)
    assert unreachable[1].startswith("unreachable: UNAVAILABLE")
    workers = {r[1]: r for r in cells(out, server.address) if r[1].startswith("worker-")}
    # worker: pushes, pushes/s, last push, lag (version - base of its newest push), duplicates
    assert workers["worker-a"][2] == "3"
    assert workers["worker-a"][5:7] == ["2", "1"]
    assert workers["worker-b"][2] == "1"
    assert workers["worker-b"][5:7] == ["4", "0"]
    # Like the admin commands: the SDK and rich, none of the daemon's modules.
    assert "rich" in {m.split(".")[0] for m in modules}
    assert heavy_in(modules) == []


def test_the_job_row_sums_several_servers(start_server, connect, tmp_path):
    first = train(start_server, connect, tmp_path / "one")
    second = start_server(mode="async")
    proc, _ = run_cli("top", "--once", "--interval", "0.05", first.address, second.address)
    assert proc.returncode == 0, proc.stderr
    assert cells(proc.stdout, second.address)[0][1] == "no model"
    [job] = cells(proc.stdout, "all")
    assert job[1] == "2 up"


def test_other_commands_do_not_import_rich():
    proc, modules = run_cli("--help")
    assert proc.returncode == 0 and "top" in proc.stdout
    assert not any(m == "rich" or m.startswith("rich.") for m in modules)


class Terminal:
    """A process on a pseudo-terminal; everything it writes, ANSI codes removed, in ``text``."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 220, 0, 0))
        env = clean_env()
        env.update(TERM="xterm-256color", COLUMNS="220", LINES="60")
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, close_fds=True
        )
        os.close(slave)
        self._raw = b""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            with self._changed:
                if not data:
                    self._raw += b"\0EOF"
                    self._changed.notify_all()
                    return
                self._raw += data
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return ANSI.sub("", self._raw.decode(errors="replace"))

    def wait_for(self, pattern: str, *, start: int = 0) -> int:
        """Wait until ``pattern`` shows after offset ``start`` of ``text``; its end offset."""
        give_up = time.monotonic() + BOUND_S
        with self._changed:
            while True:
                found = re.compile(pattern).search(self.text, start)
                if found:
                    return found.end()
                assert "\0EOF" not in self.text, self.text[-3000:]
                left = give_up - time.monotonic()
                assert left > 0, f"{pattern!r} never showed:\n{self.text[-3000:]}"
                self._changed.wait(left)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=10)
        os.close(self.master)


@pytest.mark.parametrize("quit_with", ["q", "SIGINT"])
def test_live_view_refreshes_and_quits(start_server, connect, quit_with):
    server = start_server(mode="async")
    worker = connect(server, worker_id="worker-a")
    worker.create_model(initial_variables(), json.loads(SGD_JSON))
    worker.push(grads_for())
    argv = [sys.executable, "-m", "paramserve.server", "top", "--interval", "0.1"]
    terminal = Terminal([*argv, server.address])
    try:
        after_first = terminal.wait_for(r"worker-a\s*│\s*1\s*│")
        worker.pull()
        worker.push(grads_for())
        # Only a frame drawn after the second push can show it: the view refreshed.
        later = terminal.wait_for(r"worker-a\s*│\s*2\s*│", start=after_first)
        # And the server's row is at version 2 (server, state, mode, model, version).
        server_row = re.escape(server.address) + r"\s*│\s*serving\s*│\s*async\s*│[^│]*│\s*2\s*│"
        terminal.wait_for(server_row, start=after_first)
        assert later > after_first
        if quit_with == "q":
            os.write(terminal.master, b"q")
        else:
            terminal.proc.send_signal(signal.SIGINT)
        assert terminal.proc.wait(timeout=BOUND_S) == 0, terminal.text[-3000:]
        assert "Traceback" not in terminal.text
    finally:
        terminal.close()


def test_tokens_a_worker_token_sees_all_but_snapshots(start_server, connect, tmp_path):
    server = start_server(
        mode="async",
        checkpoint_dir=tmp_path / "ckpt",
        tokens_file=write_tokens_file(tmp_path / "tokens.toml"),
    )
    admin = connect(server, token=ADMIN_TOKEN, worker_id="worker-a")
    admin.create_model(initial_variables(), json.loads(SGD_JSON))
    admin.push(grads_for())
    admin.snapshot()
    seen = {}
    for who, token in (("worker", WORKER_TOKEN), ("admin", ADMIN_TOKEN), ("nobody", None)):
        flags = []
        if token is not None:
            token_file = tmp_path / f"{who}.token"
            token_file.write_text(token)
            token_file.chmod(0o600)
            flags = ["--token-file", str(token_file)]
        proc, _ = run_cli("top", "--once", "--interval", "0.05", *flags, server.address)
        assert proc.returncode == 0, proc.stderr
        seen[who] = cells(proc.stdout, server.address)[0]
    assert seen["worker"][4] == "1" and seen["worker"][-1] == "admin only"
    assert seen["admin"][4] == "1" and seen["admin"][-1].endswith("ago")
    assert seen["nobody"][1].startswith("refused: UNAUTHENTICATED")
