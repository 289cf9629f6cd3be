"""Generated malformed pushes against live servers, under each non-finite policy."""

from __future__ import annotations

import pytest
from hypothesis import given

from . import oracle, strategies
from .conftest import POLICIES
from .live import TIMEOUT_S, LiveServer, State
from .runner import fuzz, run_case, sender

pytestmark = pytest.mark.slow


def _sequence(case: strategies.PushCase, state: State, server: LiveServer) -> int:
    last = state.workers.get(case.worker_id, (0, 0))[0]
    if case.sequence == "zero":
        return 0
    if case.sequence == "repeat":
        return last
    if case.sequence == "max":
        return 2**64 - 1
    server.sequence = max(server.sequence, last) + 1
    return server.sequence


def _run_push(server: LiveServer, family: str, case: strategies.PushCase) -> None:
    def prepare(state: State):
        messages = case.messages(_sequence(case, state, server))
        verdict = oracle.push_verdict(messages, state, server.nonfinite)
        return sender(server.stub.Push, iter(messages), timeout=TIMEOUT_S), verdict

    run_case(server, family, prepare)


@pytest.mark.parametrize("policy", POLICIES)
@fuzz(max_examples=150)
@given(case=strategies.push_cases())
def test_malformed_push_streams(servers, policy, case):
    """Wrong dtypes, shapes, byte lengths, names, limits, chunk order; NaN/Inf; bad rows."""
    _run_push(servers[policy], "push", case)


@pytest.mark.parametrize("policy", POLICIES)
@fuzz(max_examples=40)
@given(case=strategies.push_cases(nonfinite=0.9, max_mutations=0))
def test_nonfinite_gradients_follow_the_policy(servers, policy, case):
    """Well-formed pushes, most with NaN or Inf: rejected, skipped or applied per policy."""
    _run_push(servers[policy], f"nonfinite-{policy}", case)
