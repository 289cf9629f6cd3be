"""Generated pulls: unknown names, rows out of range or on scalars, scopes, versions to wait for."""

from __future__ import annotations

import pytest
from hypothesis import given

from paramserve.v1 import parameter_server_pb2 as pb

from . import oracle, strategies
from .live import TIMEOUT_S, State
from .runner import fuzz, run_case, sender

pytestmark = pytest.mark.slow

# A pull waiting for a version that never comes ends at its deadline: keep that short.
WAIT_DEADLINE_S = 0.3


def min_version_for(wait: str, state: State) -> int:
    return {
        "none": 0,
        "negative": -(2**63),
        "current": state.version,
        "future": state.version + 1,
    }[wait]


@fuzz(max_examples=120)
@given(case=strategies.pull_requests())
def test_pull(servers, case):
    request, wait = case
    server = servers["reject"]

    def prepare(state: State):
        full = pb.PullRequest()
        full.CopyFrom(request)
        full.min_version = min_version_for(wait, state)
        timeout = WAIT_DEADLINE_S if full.min_version > state.version else TIMEOUT_S
        verdict = oracle.sized(full, oracle.pull_verdict(full, state))
        return sender(server.stub.Pull, full, timeout=timeout), verdict

    run_case(server, "pull", prepare)
