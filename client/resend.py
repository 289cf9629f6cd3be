"""Resending calls that failed in transit: which failures, which calls, how often, until when.

The SDK resends a call itself (gRPC's own retries are off, see
:mod:`paramserve.client.channel`) when two things hold:

- the method is in :data:`RESENT_METHODS`: reads, and the writes the server deduplicates
  (Push and Step carry ``(worker_id, sequence, session)``: a push that took effect is
  acknowledged as a duplicate, never applied twice);
- the failure is a transport failure (:func:`is_transport_failure`): the connection or the
  stream was lost, or the server is unreachable, draining or restarting. A status the server
  chose (INVALID_ARGUMENT, FAILED_PRECONDITION, ABORTED, RESOURCE_EXHAUSTED, ...) is never
  resent, and neither is a call this client cancelled or closed itself.

Attempts follow one another with exponential backoff and jitter (:class:`ResendPolicy`), all
within the call's deadline: each attempt gets what is left of it. The caller sees an exception
only when the deadline is spent (:class:`~paramserve.client.DeadlineExceededError`), when the
next backoff would not end before it, or after ``max_attempts`` (then the last transport
error itself, usually an :class:`~paramserve.client.UnavailableError`); its message names the
method, the server address, the attempts and the last transport error, and its ``attempts``
attribute counts them.

A failure to connect at all (connection refused, unknown host, TLS handshake failed; see
:mod:`paramserve.client.unreachable`) is different: the request never left, so it is resent
for every method, but only while waiting makes sense. Attempts never use gRPC's
``wait_for_ready`` (which would hide the cause until the deadline); a client that has not
reached its server yet raises at the first such failure, or keeps trying for
``Client(wait_for_server_s=...)``; one that has reached it before (a server restarting) keeps
trying until the deadline, logging a warning at the first failure of each call. The error
then names the address and the cause (:func:`~paramserve.client.unreachable.unreachable_message`).

What a cut connection looks like (grpcio 1.85, retries off, measured through
``tests/faults/lossy_proxy.py`` with cuts in both directions, anywhere in the byte stream):
UNAVAILABLE ``Stream removed (Socket closed)``, ``(recvmsg:Connection reset by peer (104))``,
``(sendmsg: Broken pipe (32))``, ``(Transport closed (...))``; a stream reset by the peer or a
middlebox without a status maps its HTTP/2 error code: NO_ERROR, PROTOCOL_ERROR and
INTERNAL_ERROR to INTERNAL, REFUSED_STREAM to UNAVAILABLE, CANCEL to CANCELLED,
ENHANCE_YOUR_CALM to RESOURCE_EXHAUSTED, each with ``Stream removed (RST_STREAM (Received
RST_STREAM with error code N))``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from .errors import ParamServeError, from_rpc_error
from .unreachable import Reachability, is_connect_failure, unreachable_message

logger = logging.getLogger("paramserve.client")

R = TypeVar("R")

# Calls that are safe to send again: reads, and the writes the server deduplicates. Not
# CreateModel, SetHyperparameters, SetOptimizerState, snapshots, restore, upload or delete.
RESENT_METHODS = frozenset(
    {
        "Describe",
        "Pull",
        "GetStatus",
        "ListSnapshots",
        "DownloadSnapshot",
        "Push",
        "Step",
        # A sharded sync job's round calls: a commit carries the push's (worker_id,
        # sequence, session), and a decision applied twice is applied once.
        "CommitRound",
        "ApplyRound",
    }
)

# Details gRPC Python gives a call this process cancelled: never resent.
SELF_CANCELLED_DETAILS = frozenset({"Locally cancelled by application!", "Channel closed!"})

# What gRPC Python reports when the caller's request iterator raised (a local failure).
_REQUESTS_RAISED = "Exception iterating requests!"

# A status made by the client's transport when a stream went away without one from the server.
_STREAM_REMOVED = "Stream removed"
_RST_STREAM = re.compile(r"Received RST_STREAM with error code (\d+)")
# HTTP/2 error codes of a stream reset that a resend may get past: NO_ERROR (the peer ended the
# stream without a status), INTERNAL_ERROR (a peer or middlebox failed), REFUSED_STREAM (not
# processed: safe by definition), CANCEL (a peer or middlebox cancelled it). Not
# PROTOCOL_ERROR, FLOW_CONTROL_ERROR, ... (a bug a resend repeats) or ENHANCE_YOUR_CALM
# (the peer asks for less load).
_RESENT_RST_CODES = frozenset({0x0, 0x2, 0x7, 0x8})


def is_transport_failure(code: grpc.StatusCode, details: str | None) -> bool:
    """True when a call failed in transit, so that sending it again may succeed.

    UNAVAILABLE always (connection lost or refused, server draining or restarting). CANCELLED
    unless this process cancelled the call itself. INTERNAL and UNKNOWN only when the client's
    transport made the status because the stream was removed (``Stream removed (...)``), with
    an RST_STREAM error code among NO_ERROR, INTERNAL_ERROR, REFUSED_STREAM and CANCEL if the
    stream was reset. Everything else is the server's answer, or a local error: never.
    """
    details = details or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return False
    if code == grpc.StatusCode.CANCELLED and details in SELF_CANCELLED_DETAILS:
        return False
    if not details.startswith(_STREAM_REMOVED):
        # A CANCELLED the server sent (a server shutting down cancels its calls) is resent;
        # an INTERNAL or UNKNOWN with any other message is the server's (or a local) error.
        return code == grpc.StatusCode.CANCELLED
    reset = _RST_STREAM.search(details)
    return reset is None or int(reset.group(1)) in _RESENT_RST_CODES


@dataclass(frozen=True)
class ResendPolicy:
    """How a call is resent: backoff ``initial_backoff_s * multiplier**(n - 1)`` after the
    n-th failed attempt, capped at ``max_backoff_s``, times a random factor in [0.5, 1];
    ``max_attempts`` attempts at most (None: as many as the deadline allows)."""

    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                "backoff must satisfy 0 <= initial_backoff_s <= max_backoff_s. Received: "
                f"initial_backoff_s={self.initial_backoff_s}, max_backoff_s={self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1. Received: {self.multiplier}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None. Received: {self.max_attempts}")

    def backoff_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1 for the first)."""
        exponent = min(max(failures - 1, 0), 64)
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**exponent)
        return cap * (rng or random).uniform(0.5, 1.0)


def status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Code and details of a failed call (UNKNOWN and its text if it has none)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    return code or grpc.StatusCode.UNKNOWN, details or str(error)


def call_with_resends(
    method: str,
    attempt: Callable[[float], R],
    *,
    timeout_s: float,
    address: str,
    policy: ResendPolicy,
    resend: bool = True,
    closed: Callable[[], bool] = lambda: False,
    on_resend: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    reach: Reachability | None = None,
) -> R:
    """Run ``attempt(seconds_left)`` until it returns, resending on transport failures.

    ``attempt`` makes one whole call with the given timeout (building its request anew, and
    consuming a response stream completely) and lets ``grpc.RpcError`` out; any other exception
    passes through untouched. Failures become :class:`ParamServeError` subclasses here, in one
    place. With ``resend`` False (a method that is not safe to repeat) there is one attempt.

    A failure to connect (:func:`~paramserve.client.unreachable.is_connect_failure`: the
    request never left this process) is resent for every method, but only until
    ``reach.wait_for_server_s`` after the call started while no call has reached the server
    yet (``reach.reached``; a call made then has at least that long as its deadline), and
    until the deadline afterwards (a server restarting). Giving up raises an
    :class:`~paramserve.client.UnavailableError` that names the address and the cause.
    Without ``reach`` the server counts as reached.
    """
    if reach is None:
        reach = Reachability(address, reached=True)
    started = clock()
    deadline = started + timeout_s
    if not reach.reached:
        deadline = max(deadline, started + reach.wait_for_server_s)
    attempts = 0
    last_transport: str | None = None
    while True:
        attempts += 1
        try:
            result = attempt(max(deadline - clock(), 0.0))
        except grpc.RpcError as exc:
            failure = exc
        else:
            reach.reached = True
            return result
        code, details = status_of(failure)
        transport = is_transport_failure(code, details)
        connect = is_connect_failure(code, details)
        if not connect and _from_a_connection(code, details):
            reach.reached = True
        now = clock()
        tries = f"{attempts} attempt" + ("s" if attempts != 1 else "")
        where = f"{method} to {address}, {tries} in {now - started:.1f} s"
        if connect:
            # Never sent: safe to send again whatever the method, within the wait allowed.
            limit = deadline if reach.reached else min(deadline, started + reach.wait_for_server_s)
            delay = policy.backoff_s(attempts, rng)
            out_of_attempts = policy.max_attempts is not None and attempts >= policy.max_attempts
            if closed() or out_of_attempts or now + delay >= limit:
                raise _unreachable(failure, reach, where, attempts)
            last_transport = unreachable_message(details, reach)
            logger.log(
                logging.WARNING if attempts == 1 else logging.INFO,
                "%s: %s; trying again for up to %.0f s more (attempt %d)",
                method,
                last_transport,
                limit - now,
                attempts,
            )
            if on_resend is not None:
                on_resend()
            sleep(delay)
            continue
        if not (resend and transport) or closed():
            if transport or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                error = _give_up(failure, where, attempts, last_transport)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and not reach.reached:
                    error.message += (
                        f"; no call of this client has reached {address} yet: check that "
                        "the server runs there and that a firewall lets the port through"
                    )
                    error.args = (error.message,)
                raise error
            raise from_rpc_error(failure)  # the server's answer, as it gave it
        delay = policy.backoff_s(attempts, rng)
        out_of_attempts = policy.max_attempts is not None and attempts >= policy.max_attempts
        if out_of_attempts or now + delay >= deadline:
            # No attempt left, or none could start before the deadline: the last error.
            raise _give_up(failure, where, attempts, None)
        last_transport = f"{code.name}: {details}"
        logger.info(
            "%s to %s: attempt %d failed in transit (%s); resending in %.0f ms",
            method,
            address,
            attempts,
            last_transport,
            delay * 1000,
        )
        if on_resend is not None:
            on_resend()
        sleep(delay)


def _from_a_connection(code: grpc.StatusCode, details: str) -> bool:
    """True when a status shows that a connection to the server was set up: anything but a
    deadline (it may have passed while connecting), a request iterator that raised, or this
    process's own cancellation."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or details == _REQUESTS_RAISED:
        return False
    return not (code == grpc.StatusCode.CANCELLED and details in SELF_CANCELLED_DETAILS)


def _unreachable(
    failure: grpc.RpcError, reach: Reachability, where: str, attempts: int
) -> ParamServeError:
    """The error for a server this client could not connect to: address, cause, what to do."""
    _, details = status_of(failure)
    error = from_rpc_error(failure)
    error.message = f"{unreachable_message(details, reach)} ({where}; gRPC: {details})"
    if not reach.reached and reach.wait_for_server_s == 0 and "Connection refused" in details:
        error.message += (
            ". To wait for a server that is still starting, pass Client(wait_for_server_s=...) "
            "or set PARAMSERVE_WAIT_FOR_SERVER_S (seconds)"
        )
    error.args = (error.message,)
    error.attempts = attempts
    return error


def _give_up(
    failure: grpc.RpcError, where: str, attempts: int, last_transport: str | None
) -> ParamServeError:
    """The error the caller sees: what, where, how often, and the last transport error."""
    error = from_rpc_error(failure)
    error.message += f" ({where}"
    if last_transport is not None:
        error.message += f"; last transport error: {last_transport}"
    error.message += ")"
    error.args = (error.message,)
    error.attempts = attempts
    return error
