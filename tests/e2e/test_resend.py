"""The SDK's own resends: which failures are resent, how, until when (client/resend.py).

The unit tests drive :func:`call_with_resends` with fake failures, a fake clock and no
sleeping. The others run a real server behind :class:`~tests.support.lossy_proxy.LossyProxy`
with scripted cuts (connection 0 is cut where the test says, later connections pass), so
each cut is certain; every one of them surfaced an error to the caller with the previous SDK
(gRPC's retries, which stop once a push outgrows the retry buffer or the reply has begun).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from paramserve.client import (
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    ParamServeError,
    ResourceExhaustedError,
    UnavailableError,
)
from paramserve.client.resend import ResendPolicy, call_with_resends, is_transport_failure
from paramserve.client.unreachable import (
    Reachability,
    connect_failure_cause,
    is_connect_failure,
)
from tests.support.asserts import assert_same
from tests.support.lossy_proxy import CutPlan, LossyProxy

C = grpc.StatusCode
RST = "Stream removed (RST_STREAM (Received RST_STREAM with error code {}))"
BIG = 1 << 20  # float32 elements: 4 MiB, more than gRPC's retry buffer held (2 MiB + 64 KiB)
SGD = {"class_name": "SGD", "config": {"learning_rate": 0.5}}


SERVER_ANSWERS = (
    C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.PERMISSION_DENIED, C.RESOURCE_EXHAUSTED,
    C.FAILED_PRECONDITION, C.ABORTED, C.OUT_OF_RANGE, C.UNIMPLEMENTED, C.DATA_LOSS,
    C.UNAUTHENTICATED, C.DEADLINE_EXCEEDED, C.INTERNAL, C.UNKNOWN,
)  # fmt: skip


# --- which failures are resent --------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "details"),
    [
        # What cut connections produced through the lossy proxy (grpcio 1.85.3, retries off).
        (C.UNAVAILABLE, "Stream removed (Socket closed)"),
        (C.UNAVAILABLE, "Stream removed (recvmsg:Connection reset by peer (104))"),
        (C.UNAVAILABLE, "Stream removed (sendmsg: Broken pipe (32))"),
        (C.UNAVAILABLE, "Stream removed (Transport closed (Socket closed))"),
        (C.UNAVAILABLE, RST.format(7)),  # REFUSED_STREAM: never processed
        (C.CANCELLED, RST.format(8)),  # CANCEL from a peer or middlebox
        (C.INTERNAL, RST.format(0)),  # NO_ERROR: the stream ended without a status
        (C.INTERNAL, RST.format(2)),  # INTERNAL_ERROR of a peer or middlebox
        (C.UNKNOWN, "Stream removed"),
        # No server, or one that is restarting or draining.
        (C.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: ..."),
        (C.UNAVAILABLE, "the server is shutting down; pushes are refused"),
        (C.CANCELLED, "Cancelled"),  # a server cancelling its calls at shutdown
    ],
)
def test_transport_failures_are_resent(code, details):
    assert is_transport_failure(code, details)


@pytest.mark.parametrize(
    ("code", "details"),
    [
        # This process cancelled the call, or closed the client.
        (C.CANCELLED, "Locally cancelled by application!"),
        (C.CANCELLED, "Channel closed!"),
        # A reset a resend would only repeat, or one asking for less load.
        (C.INTERNAL, RST.format(1)),  # PROTOCOL_ERROR
        (C.RESOURCE_EXHAUSTED, RST.format(11)),  # ENHANCE_YOUR_CALM
        # The server's own answers, whatever they say.
        (C.INTERNAL, "unexpected error while applying the push"),
        (C.UNKNOWN, "Exception iterating requests!"),  # the caller's request iterator raised
        (C.INVALID_ARGUMENT, "Stream removed"),
        (C.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        *[(code, "the server's message") for code in SERVER_ANSWERS],
    ],
)
def test_server_answers_and_own_cancellations_are_not_resent(code, details):
    assert not is_transport_failure(code, details)


# --- the loop, with fake failures and a fake clock ------------------------------------------
class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def run(
    failures: list[FakeRpcError],
    *,
    timeout_s: float = 60.0,
    policy: ResendPolicy | None = None,
    resend: bool = True,
    closed: Callable[[], bool] = lambda: False,
    attempt_s: float = 0.1,
) -> tuple[Clock, list[float]]:
    """Attempts fail with ``failures`` in turn (each taking ``attempt_s``), then succeed."""
    clock, timeouts = Clock(), []

    def attempt(seconds_left: float) -> str:
        timeouts.append(seconds_left)
        clock.now += attempt_s
        if failures:
            raise failures.pop(0)
        return "ok"

    result = call_with_resends(
        "Push",
        attempt,
        timeout_s=timeout_s,
        address="10.0.0.7:50051",
        policy=policy or ResendPolicy(),
        resend=resend,
        closed=closed,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(0),
    )
    assert result == "ok"
    return clock, timeouts


def cut() -> FakeRpcError:
    return FakeRpcError(C.UNAVAILABLE, "Stream removed (Socket closed)")


def test_resends_until_success_with_growing_jittered_backoff_within_the_deadline():
    policy = ResendPolicy(initial_backoff_s=0.05, max_backoff_s=0.4, multiplier=2.0)
    clock, timeouts = run([cut() for _ in range(7)], timeout_s=60.0, policy=policy)
    caps = [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert len(clock.sleeps) == 7 and len(timeouts) == 8
    assert all(cap / 2 <= s <= cap for s, cap in zip(clock.sleeps, caps, strict=True))
    # Each attempt gets what is left of the one deadline.
    assert timeouts[0] == pytest.approx(60.0)
    assert all(b < a for a, b in itertools.pairwise(timeouts))


def test_a_server_answer_is_raised_at_once_with_its_message():
    with pytest.raises(InvalidArgumentError) as info:
        run([FakeRpcError(C.INVALID_ARGUMENT, "tensor 'w' has dtype float64")])
    assert info.value.message == "tensor 'w' has dtype float64" and info.value.attempts == 1


def test_the_deadline_spent_is_a_deadline_error_naming_the_address_and_the_last_cut():
    failures = [cut(), cut(), FakeRpcError(C.DEADLINE_EXCEEDED, "Deadline Exceeded")]
    with pytest.raises(DeadlineExceededError) as info:
        run(failures)
    message = info.value.message
    assert "Push to 10.0.0.7:50051, 3 attempts" in message
    assert "last transport error: UNAVAILABLE: Stream removed (Socket closed)" in message
    assert info.value.attempts == 3


def test_no_time_left_for_another_attempt_raises_the_last_unavailable():
    # Attempts take 0.48 s of a 1 s deadline: after the second, no backoff ends in time.
    with pytest.raises(UnavailableError) as info:
        run([cut(), cut(), cut()], timeout_s=1.0, attempt_s=0.48)
    assert info.value.attempts == 2
    assert info.value.message.startswith("Stream removed (Socket closed) (Push to 10.0.0.7")


def test_max_attempts_and_methods_not_resent_stop_early():
    with pytest.raises(UnavailableError) as info:
        run([cut(), cut(), cut()], policy=ResendPolicy(max_attempts=2))
    assert info.value.attempts == 2
    with pytest.raises(UnavailableError) as info:
        run([cut()], resend=False)  # e.g. CreateModel: not safe to send twice
    assert info.value.attempts == 1 and "10.0.0.7:50051" in info.value.message


def test_a_closed_client_does_not_resend():
    with pytest.raises(UnavailableError) as info:
        run([cut(), cut()], closed=lambda: True)
    assert info.value.attempts == 1


def test_policy_is_checked():
    with pytest.raises(ValueError, match="backoff"):
        ResendPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)
    with pytest.raises(ValueError, match="max_attempts"):
        ResendPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="max_attempts"):
        Client(retry_max_attempts=0)


# --- real cuts through the proxy ------------------------------------------------------------
def first_connection(plan: CutPlan) -> Callable[[random.Random], CutPlan]:
    """Connection 0 is cut as ``plan`` says (connection numbers are in accept order); the
    ones after it pass everything."""
    plans = iter([plan])
    return lambda rng: next(plans, CutPlan())


@pytest.fixture
def model(start_server):
    server = start_server(mode="async")
    weights = {"big": np.zeros(BIG, np.float32), "small": np.zeros(8, np.float32)}
    with Client(server.address, timeout_s=30) as admin:
        admin.create_model(weights, SGD)
    return server


def through(server, plan: CutPlan, **options) -> tuple[LossyProxy, Client]:
    proxy = LossyProxy(("127.0.0.1", server.port), seed=0, plan=first_connection(plan))
    options.setdefault("timeout_s", 30.0)
    return proxy, Client(proxy.address, worker_id="w", **options)


def applied_once(server, grads: dict[str, np.ndarray]) -> None:
    """The server holds the initial weights moved by exactly one SGD step of ``grads``."""
    with Client(server.address, timeout_s=30) as admin:
        weights, status = admin.pull(), admin.status()
    assert (status.version, status.worker("w").pushes) == (1, 1)
    for name, grad in grads.items():
        assert_same({name: weights[name]}, {name: np.float32(-0.5) * grad})


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
def test_a_4_mib_push_cut_mid_upload_past_the_old_retry_buffer_is_resent(model, reset):
    grads = {"big": np.random.default_rng(1).standard_normal(BIG, dtype=np.float32)}
    proxy, client = through(model, CutPlan(up_at=3 << 20, reset=reset))
    with proxy, client:
        result = client.push(grads, sequence=1)
        assert (result.duplicate, result.version, client.resends) == (False, 1, 1)
        assert [(c.direction, c.position) for c in proxy.cuts] == [("up", 3 << 20)]
    applied_once(model, grads)


def test_a_push_whose_acknowledgement_is_cut_is_resent_and_acknowledged_as_a_duplicate(model):
    grads = {"small": np.arange(1, 9, dtype=np.float32)}
    proxy, client = through(model, CutPlan(down_at=3))  # 3 bytes into the first reply
    with proxy, client:
        result = client.push(grads, sequence=1)
        assert (result.duplicate, result.version, client.resends) == (True, 1, 1)
        assert [c.direction for c in proxy.cuts] == ["down"]
    applied_once(model, grads)


def test_a_step_whose_weights_are_cut_mid_reply_is_resent(model):
    grads = {"small": np.arange(1, 9, dtype=np.float32)}
    proxy, client = through(model, CutPlan(down_at=100 << 10))  # Describe's reply, then this
    with proxy, client:
        client.describe()
        weights = client.step(grads, sequence=1)
        assert (weights.push_result.duplicate, weights.version, client.resends) == (True, 1, 1)
        assert_same({"small": weights["small"]}, {"small": np.float32(-0.5) * grads["small"]})
    applied_once(model, grads)


def test_a_pull_cut_mid_reply_is_resent_whole(model):
    proxy, client = through(model, CutPlan(down_at=3 << 20, reset=False))
    with proxy, client:
        out = np.full(BIG, 7.0, np.float32)
        weights = client.pull(["big"], out={"big": out})
        assert weights["big"] is out and not out.any() and client.resends == 1


def test_a_stream_reset_by_a_middlebox_is_resent(model):
    grads = {"small": np.ones(8, np.float32)}
    proxy, client = through(model, CutPlan(up_at=10, rst_stream=0x2, reset=False))
    with proxy, client:
        assert client.push(grads, sequence=1).version == 1 and client.resends == 1
    applied_once(model, grads)


def test_a_reset_asking_for_less_load_is_not_resent(model):
    proxy, client = through(model, CutPlan(up_at=10, rst_stream=0xB, reset=False))
    with proxy, client, pytest.raises(ResourceExhaustedError):
        client.push({"small": np.ones(8, np.float32)}, sequence=1)
    assert client.resends == 0


def test_a_refused_push_is_not_resent(model):
    proxy, client = through(model, CutPlan())
    with proxy, client, pytest.raises(InvalidArgumentError, match="shape"):
        client.push({"small": np.ones(9, np.float32)}, sequence=1)
    assert client.resends == 0 and proxy.connections == 1


def test_create_model_is_not_resent_and_its_error_names_the_server(start_server):
    server = start_server(mode="async")
    proxy, client = through(server, CutPlan(up_at=100))
    with proxy, client, pytest.raises(UnavailableError) as info:
        client.create_model({"w": np.zeros(1000, np.float32)}, SGD)
    assert client.resends == 0 and info.value.attempts == 1
    assert f"CreateModel to {proxy.address}, 1 attempt" in info.value.message


def test_a_link_that_never_lets_a_push_through_fails_at_the_deadline(model):
    """Every connection dies 1 KiB into the upload: attempts go on until the deadline."""
    proxy = LossyProxy(("127.0.0.1", model.port), seed=0, plan=lambda rng: CutPlan(up_at=1024))
    client = Client(proxy.address, worker_id="w", timeout_s=2.0)
    with proxy, client, pytest.raises((DeadlineExceededError, UnavailableError)) as info:
        client.push({"small": np.ones(8, np.float32), "big": np.ones(BIG, np.float32)}, sequence=1)
    error = info.value
    assert error.attempts >= 1 and client.resends == error.attempts - 1
    assert proxy.address in error.message and "Stream removed" in error.message
    # With an attempt cap (and a deadline nothing but a hang reaches), the count is exact.
    proxy = LossyProxy(("127.0.0.1", model.port), seed=0, plan=lambda rng: CutPlan(up_at=1024))
    capped = Client(proxy.address, worker_id="w", timeout_s=60.0, retry_max_attempts=3)
    with proxy, capped, pytest.raises(UnavailableError) as info:
        capped.push({"small": np.ones(8, np.float32), "big": np.ones(BIG, np.float32)}, sequence=1)
    assert info.value.attempts == 3 and capped.resends == 2
    with Client(model.address, timeout_s=30) as admin:
        assert admin.status().version == 0  # nothing half-applied


# --- connect failures: never sent, so resent for any method, within the wait allowed ----------
def refused() -> FakeRpcError:
    return FakeRpcError(
        C.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50051: "
        "Failed to connect to remote host: Connection refused",
    )


def run_reach(failures, reach: Reachability, *, resend: bool = True, timeout_s: float = 60.0):
    clock = Clock()

    def attempt(seconds_left: float) -> str:
        clock.now += 0.01
        if failures:
            raise failures.pop(0)
        return "ok"

    result = call_with_resends(
        "CreateModel",
        attempt,
        timeout_s=timeout_s,
        address=reach.address,
        policy=ResendPolicy(),
        resend=resend,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(0),
        reach=reach,
    )
    return result, clock


def test_a_server_never_reached_is_reported_after_one_attempt():
    reach = Reachability("10.0.0.7:50051")
    with pytest.raises(UnavailableError) as info:
        run_reach([refused(), refused()], reach)
    assert info.value.attempts == 1
    assert info.value.message.startswith(
        "cannot reach the paramserve server at 10.0.0.7:50051: connection refused"
    )
    assert not reach.reached


def test_wait_for_server_resends_connect_failures_of_any_method_then_gives_up():
    reach = Reachability("10.0.0.7:50051", wait_for_server_s=5.0)
    result, clock = run_reach([refused(), refused(), refused()], reach, resend=False)
    assert result == "ok" and len(clock.sleeps) == 3 and reach.reached
    reach = Reachability("10.0.0.7:50051", wait_for_server_s=5.0)
    with pytest.raises(UnavailableError, match="connection refused") as info:
        run_reach([refused() for _ in range(1000)], reach)
    # The 5 s wait, not the call's 60 s deadline, bounded it (backoff grows to 2 s at most:
    # 60 s would take about 30 attempts; the fake clock makes the count exact, not timed).
    assert 1 < info.value.attempts < 15
    assert "wait_for_server_s" not in info.value.message  # the hint is for those who did not wait


def test_a_server_reached_before_is_waited_for_within_the_deadline():
    reach = Reachability("10.0.0.7:50051", reached=True)
    result, clock = run_reach([refused() for _ in range(20)], reach, resend=False)
    assert result == "ok" and len(clock.sleeps) == 20
    with pytest.raises(UnavailableError, match="cannot reach") as info:
        run_reach([refused() for _ in range(1000)], reach, timeout_s=10.0)
    assert 1 < info.value.attempts < 1000


def test_the_first_answer_marks_the_server_reached():
    reach = Reachability("10.0.0.7:50051")
    with pytest.raises(InvalidArgumentError):
        run_reach([FakeRpcError(C.INVALID_ARGUMENT, "bad")], reach)
    assert reach.reached
    reach = Reachability("10.0.0.7:50051")
    with pytest.raises(DeadlineExceededError, match="no call of this client has reached"):
        run_reach([FakeRpcError(C.DEADLINE_EXCEEDED, "Deadline Exceeded")], reach)
    assert not reach.reached


@pytest.mark.parametrize(
    ("details", "tls", "cause"),
    [
        # gRPC's words as grpcio 1.85 gave them (the real cases run in test_unreachable.py).
        ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
         "Failed to connect to remote host: Connection refused", False, "connection refused"),
        ("errors resolving x.invalid:1: [... Domain name not found]", False, "unknown host"),
        ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9: "
         "Socket closed", False, "it probably uses TLS"),
        ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9: "
         "Socket closed", True, "it may require a client certificate"),
        ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.1.2.3:50051: "
         "Failed to connect to remote host: Timeout occurred: FD Shutdown", False,
         "the connection timed out"),
        ("failed to connect to all addresses; last error: UNKNOWN: something new", False,
         "the connection could not be set up"),
    ],
)  # fmt: skip
def test_connect_failure_causes(details, tls, cause):
    assert is_connect_failure(C.UNAVAILABLE, details)
    assert cause in connect_failure_cause(details, tls=tls)


def test_a_request_iterator_that_raised_does_not_mark_the_server_reached():
    reach = Reachability("10.0.0.7:50051")
    with pytest.raises(ParamServeError):
        run_reach([FakeRpcError(C.UNKNOWN, "Exception iterating requests!")], reach)
    assert not reach.reached
