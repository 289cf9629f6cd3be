"""The README's Quick start and its secured tour run as written, against real processes.

The blocks are found by the HTML comment before them (``<!-- quickstart`` and
``<!-- quickstart-secured``). Each line runs in bash in a temporary working folder holding a
copy of ``examples/``, with two substitutions only: ``.venv/bin/`` becomes the folder of this
test's interpreter, and port 50051 a free port. The install line is skipped (this interpreter
is the installed paramserve). A line ending in ``&`` is started as a process (a ``serve`` line
is waited for until it listens) and stopped with SIGTERM at the end; every other line must
exit 0. The secured tour runs twice: as written, and with the additions its text gives for
mutual TLS. Also: every link in README.md and docs/*.md points at a file of the repository, and
every ``#anchor`` at a heading of its file.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import clean_env, free_port
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 300.0


def readme_block(marker: str) -> list[str]:
    """The command lines of the bash block right after ``<!-- marker`` (continuations joined)."""
    text = README.read_text()
    found = re.search(rf"<!-- {re.escape(marker)}[ :][^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert found, f"README.md has no bash block marked <!-- {marker} -->"
    joined = found.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


def adapt(line: str, port: int) -> str:
    """The line with the venv prefix and the port substituted, nothing else."""
    return line.replace(".venv/bin/", shlex.quote(str(BIN)) + "/").replace("50051", str(port))


class Session:
    """Runs README lines in ``cwd``; keeps the backgrounded processes to stop them."""

    def __init__(self, cwd: Path, port: int) -> None:
        self.cwd = cwd
        self.port = port
        self.env = clean_env()
        self.background: list[tuple[str, subprocess.Popen, Path]] = []
        self.outputs: dict[str, subprocess.CompletedProcess] = {}

    def run_all(self, lines: list[str]) -> None:
        for line in lines:
            if "pip install" in line:
                continue  # the install: this interpreter's environment is the installed one
            if line.endswith("&"):
                self.start(line)
            else:
                self.run(line)

    def start(self, line: str) -> None:
        command = adapt(line[:-1].strip(), self.port)
        log = self.cwd / f"background-{len(self.background)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["bash", "-c", "exec " + command],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.background.append((line, proc, log))
        if "paramserve serve" in line:

            def listening() -> bool:
                assert proc.poll() is None, f"`{line}` exited:\n{log.read_text()}"
                return "event=listening" in log.read_text()

            wait_until(listening, RUN_TIMEOUT_S, what=f"`{line}` to listen")

    def run(self, line: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            ["bash", "-c", adapt(line, self.port)],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert out.returncode == 0, f"`{line}` exited {out.returncode}:\n{out.stdout}{out.stderr}"
        self.outputs[line] = out
        return out

    def output_of(self, *fragments: str) -> str:
        """The stdout of the one line run that contains every one of ``fragments``."""
        found = [
            out.stdout
            for line, out in self.outputs.items()
            if all(fragment in line for fragment in fragments)
        ]
        assert len(found) == 1, f"{len(found)} lines run contain {fragments!r}"
        return found[0]

    def stop(self) -> list[int]:
        """SIGTERM every backgrounded process (the orderly stop) and their exit statuses."""
        codes = []
        for line, proc, log in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes.append(proc.wait(timeout=RUN_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"`{line}` did not stop:\n{log.read_text()}") from None
        return codes


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    s = Session(tmp_path, free_port())
    try:
        yield s
    finally:
        for _, proc, _ in s.background:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def last_version(worker_output: str) -> int:
    """The model version on the worker's last progress line (`... version N loss L`)."""
    lines = [line.split() for line in worker_output.splitlines() if " version " in line]
    assert lines, f"the worker printed no progress:\n{worker_output}"
    losses = [float(words[-1]) for words in lines]
    assert losses[-1] < losses[0], f"the loss did not fall:\n{worker_output}"
    return int(lines[-1][lines[-1].index("version") + 1])


def test_quick_start_runs_as_written(session: Session) -> None:
    lines = readme_block("quickstart")
    assert len(lines) <= 10
    assert sum(line.endswith("&") and "paramserve serve" in line for line in lines) == 1
    session.run_all(lines)
    version = last_version(session.output_of("examples/worker.py"))
    status = json.loads(session.output_of("paramserve status"))
    assert status["has_model"] and status["version"] == version > 0
    assert session.stop() == [0]


def with_mutual_tls(line: str) -> str:
    """The line as the text after the secured block says for mutual TLS."""
    if line.endswith("&") and "paramserve serve" in line:
        return line[:-1].rstrip() + " --tls-client-ca ca.pem &"
    if "examples/worker.py" in line or "paramserve status" in line:
        return line + " --tls-cert client.pem --tls-key client.key"
    return line


def refused(session: Session, line: str) -> str:
    """The stderr of ``line``, which must exit 1 (a refused admin command)."""
    out = subprocess.run(
        ["bash", "-c", adapt(line, session.port)],
        cwd=session.cwd,
        env=session.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert out.returncode == 1, f"`{line}` exited {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the secured tour needs openssl")
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_secured_tour_runs_as_written(session: Session, mutual: bool) -> None:
    lines = readme_block("quickstart-secured")
    if mutual:
        lines = [with_mutual_tls(line) for line in lines]
    session.run_all(lines)
    assert "the model is on the server" in session.output_of(
        "examples/worker.py", "--token-file admin.token"
    )
    version = last_version(session.output_of("examples/worker.py", "--token-file worker.token"))
    status = json.loads(session.output_of("paramserve status"))
    assert status["has_model"] and status["version"] == version > 0
    snapshot = ".venv/bin/paramserve snapshot --address 127.0.0.1:50051 --tls-ca ca.pem"
    if mutual:
        # Without a client certificate the connection itself is refused.
        assert "UNAVAILABLE" in refused(session, snapshot + " --token-file admin.token")
        snapshot += " --tls-cert client.pem --tls-key client.key"
    # What the text after the block says: a worker token may not snapshot, nor may no token.
    assert "PERMISSION_DENIED" in refused(session, snapshot + " --token-file worker.token")
    assert "UNAUTHENTICATED" in refused(session, snapshot)
    assert session.stop() == [0]


# --- links ---------------------------------------------------------------------------------
LINK = re.compile(r"\]\(([^)\s]+)\)")
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]


def headings(path: Path) -> set[str]:
    """GitHub's anchors of the Markdown headings of ``path`` (outside code blocks)."""
    anchors: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return LINK.findall(text)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_in_the_repository_and_anchors_exist(document: Path) -> None:
    for target in links(document):
        if re.match(r"https?://", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (document.parent / file_part).resolve() if file_part else document
        assert path.is_relative_to(REPO), f"{document.name}: {target} points outside the repo"
        assert path.exists(), f"{document.name}: {target} does not exist"
        if anchor:
            assert anchor in headings(path), f"{document.name}: no heading for {target}"
