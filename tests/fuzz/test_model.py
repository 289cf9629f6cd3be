"""Generated CreateModel, SetOptimizerState and SetHyperparameters requests against live servers."""

from __future__ import annotations

import pytest
from hypothesis import given

from paramserve.v1 import parameter_server_pb2 as pb

from . import oracle, oracle_admin, strategies
from .live import TIMEOUT_S, State
from .runner import fuzz, run_case, sender

pytestmark = pytest.mark.slow


@fuzz(max_examples=120)
@given(messages=strategies.create_cases())
def test_create_model_over_an_existing_model(servers, messages):
    """Malformed definitions are refused; a valid one is a no-op or ALREADY_EXISTS."""
    server = servers["reject"]

    def prepare(state: State):
        verdict = oracle_admin.create_verdict(messages, state)
        return sender(server.stub.CreateModel, iter(messages), timeout=TIMEOUT_S), verdict

    run_case(server, "create_model", prepare)


@fuzz(max_examples=80)
@given(messages=strategies.set_state_cases())
def test_set_optimizer_state(servers, messages):
    """Every optimizer variable with its dtype and shape; counters >= 0, a finite rate."""
    server = servers["reject"]

    def prepare(state: State):
        verdict = oracle_admin.set_state_verdict(messages, state)
        return sender(server.stub.SetOptimizerState, iter(messages), timeout=TIMEOUT_S), verdict

    run_case(server, "set_optimizer_state", prepare)


@fuzz(max_examples=60)
@given(values=strategies.hyperparameters())
def test_set_hyperparameters(servers, values):
    """Unknown names, NaN, Inf and values the optimizer refuses: INVALID_ARGUMENT."""
    server = servers["skip"]
    request = pb.SetHyperparametersRequest(values=values)

    def prepare(state: State):
        verdict = oracle.sized(
            request, oracle_admin.hyperparameters_verdict(dict(request.values), state)
        )
        return sender(server.stub.SetHyperparameters, request, timeout=TIMEOUT_S), verdict

    run_case(server, "set_hyperparameters", prepare)
