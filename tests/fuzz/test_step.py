"""Generated Step requests: a push and a pull in one message each way, inline tensors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paramserve.v1 import parameter_server_pb2 as pb

from . import oracle, spec, strategies
from .live import TIMEOUT_S, State
from .runner import fuzz, run_case, sender

pytestmark = pytest.mark.slow


@st.composite
def step_requests(draw) -> tuple[pb.StepRequest, str]:
    """A StepRequest built from a (possibly damaged) push stream, and its sequence kind."""
    case = draw(strategies.push_cases())
    payloads: dict[int, bytes] = {}
    for c in case.chunks:  # the damaged chunks, joined per tensor (out of range ones dropped)
        if c.tensor < len(case.headers):
            payloads[c.tensor] = payloads.get(c.tensor, b"") + c.data
    gradients = []
    for i, h in enumerate(case.headers):
        inline = draw(st.sampled_from(["unset", "unset", "same", "other"]))
        gradient = pb.InlineTensor(data=payloads.get(i, b""))
        if inline == "same":
            gradient.header.CopyFrom(h)
        elif inline == "other":
            gradient.header.CopyFrom(h)
            gradient.header.name += "-other"
        gradients.append(gradient)
    how = draw(st.sampled_from(["same"] * 6 + ["drop", "extra"]))
    if how == "drop" and gradients:
        gradients.pop()
    elif how == "extra":
        gradients.append(pb.InlineTensor(data=b"\0" * 4))
    pull, _ = draw(strategies.pull_requests())
    if draw(st.sampled_from([True, True, False])):  # mostly a valid selection
        pull = pb.PullRequest(
            names=draw(st.lists(st.sampled_from(list(spec.VARIABLES)), max_size=3))
        )
    pull.min_version = draw(st.sampled_from([0, 0, 7]))  # ignored by Step
    pull.scope = draw(st.sampled_from([0] * 8 + [1, 2]))
    request = pb.StepRequest(
        push=pb.PushHeader(worker_id=case.worker_id, tensors=case.headers),
        gradients=gradients,
        pull=pull,
    )
    return request, case.sequence


@pytest.mark.parametrize("policy", ["skip", "allow"])
@fuzz(max_examples=60)
@given(case=step_requests())
def test_step(servers, policy, case):
    template, sequence = case
    server = servers[policy]

    def prepare(state: State):
        request = pb.StepRequest()
        request.CopyFrom(template)
        last = state.workers.get(request.push.worker_id, (0, 0))[0]
        if sequence == "fresh":
            server.sequence = max(server.sequence, last) + 1
        request.push.sequence = {"zero": 0, "repeat": last, "max": 2**64 - 1}.get(
            sequence, server.sequence
        )
        verdict = oracle.step_verdict(request, state, server.nonfinite)
        return sender(server.stub.Step, request, timeout=TIMEOUT_S), verdict

    run_case(server, "step", prepare)
