"""The README's sharded walkthrough runs as written and ends where one server would.

The block after ``<!-- sharded-walkthrough -->`` starts a 3-shard sync job, trains the demo
model with two `paramserve worker` processes, takes a snapshot, downloads it, re-shards it to
2 shards, uploads it to a 2-shard job and trains on. Every port in it is replaced by a free
one. The same worker commands are then run against one server (no snapshot, no re-sharding),
and the final weights and optimizer state of both must be equal bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from paramserve.client import Client
from tests.docs.test_readme import Session, readme_block
from tests.support.processes import free_port

PORT = re.compile(r"\b500[6-9]\d\b")


class PortSession(Session):
    """A README session whose every 5006x-5009x port becomes a free port."""

    def __init__(self, cwd: Path) -> None:
        super().__init__(cwd, free_port())
        self.ports: dict[str, str] = {}

    def _ported(self, line: str) -> str:
        def free(match: re.Match[str]) -> str:
            return self.ports.setdefault(match.group(0), str(free_port()))

        return PORT.sub(free, line)

    def start(self, line: str) -> None:
        super().start(self._ported(line))

    def run(self, line: str):
        return super().run(self._ported(line))

    def address(self, *ports: int) -> list[str]:
        return [f"127.0.0.1:{self.ports[str(p)]}" for p in ports]


def _final_state(address: str | list[str]) -> tuple[int, dict[str, np.ndarray]]:
    with Client(address, timeout_s=60) as client:
        weights = client.pull()
        state = {**{f"w/{n}": v for n, v in weights.items()}, **client.optimizer_state()}
        return weights.version, state


def test_the_sharded_walkthrough_reshards_and_matches_one_server(tmp_path: Path) -> None:
    lines = readme_block("sharded-walkthrough")
    sharded = PortSession(tmp_path / "sharded")
    sharded.cwd.mkdir()
    one = PortSession(tmp_path / "one")
    one.cwd.mkdir()
    try:
        sharded.run_all(lines)
        resharded = sharded.address(50071, 50072)
        version, state = _final_state(resharded)
        # The same two worker phases against one server.
        workers = [line for line in lines if "paramserve worker" in line]
        assert len(workers) == 4
        single = "127.0.0.1:50081"
        one.start(".venv/bin/paramserve serve --port 50081 --replicas 2 &")
        for line in workers:
            replaced = re.sub(r"--address \S+", f"--address {single}", line)
            if replaced.endswith("&"):
                one.start(replaced)
            else:
                one.run(replaced)
        expected_version, expected = _final_state(f"127.0.0.1:{one.ports['50081']}")
    finally:
        for session in (sharded, one):
            session.stop()
    assert version == expected_version == 80
    assert sorted(state) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(state[name], expected[name], err_msg=name, strict=True)
