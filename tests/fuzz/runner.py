"""Run one generated request against a live server and check it against the oracle."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
from hypothesis import HealthCheck, settings

from .live import LiveServer, State, call_code, record
from .oracle import Verdict

# Reproducible in CI: the same examples on every run, nothing read from or written to a
# local example database.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)


Send = Callable[[], tuple[grpc.StatusCode, str, Any]]


def sender(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Send:
    return lambda: call_code(fn, *args, **kwargs)


def run_case(
    server: LiveServer,
    family: str,
    prepare: Callable[[State], tuple[Send, Verdict]],
) -> grpc.StatusCode:
    """Send one request; assert its status code, its reply, and the state it leaves behind.

    ``prepare`` gets the state before the call and returns the call and the oracle's verdict.
    A rejected request must leave the state bit-identical; an accepted one must lead to the
    verdict's expected state. The server process must still be running afterwards.
    """
    before = server.cached_state or server.state()
    server.cached_state = None
    send, verdict = prepare(before)
    code, details, reply = send()
    record(family, code)
    if os.environ.get("FUZZ_LOG"):  # one line per case, to see what the corpus covers
        with open(os.environ["FUZZ_LOG"], "a") as log:
            log.write(f"{family}\t{code.name}\t{details[:120]!r}\n")
    assert server.process.poll() is None, f"{family}: the server died:\n{server.stderr()[-4000:]}"
    if verdict.codes:
        wanted = sorted(c.name for c in verdict.codes)
        assert code in verdict.codes, f"{family}: expected {wanted}, got {code.name}: {details}"
        assert details.strip(), f"{family}: {code.name} without a message"
    else:
        assert code is grpc.StatusCode.OK, f"{family}: expected OK, got {code.name}: {details}"
        if verdict.check_reply is not None:
            verdict.check_reply(reply)
    after = server.state()
    expected = verdict.expect(before) if code is grpc.StatusCode.OK and verdict.expect else before
    differences = expected.differences(after)
    assert not differences, f"{family} ({code.name}): state differs: {differences}"
    server.cached_state = after
    return code
