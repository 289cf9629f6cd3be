"""Domain errors of the daemon, each naming the gRPC status code it maps to.

The store, aggregator and snapshot code raise these (plain Python, no gRPC import);
the servicer maps them to status codes in one place. Messages say what was expected
and what arrived, so a user can act on them.
"""

from __future__ import annotations


class ParamServeError(Exception):
    """Base class; ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "INTERNAL"


class InvalidArgument(ParamServeError):
    """Malformed tensor, shape, dtype, size, unknown option, non-finite gradient."""

    code = "INVALID_ARGUMENT"


class NotFound(ParamServeError):
    """Unknown variable, snapshot, or no model yet."""

    code = "NOT_FOUND"


class AlreadyExists(ParamServeError):
    """A model already exists with another definition."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(ParamServeError):
    """Push too stale, wrong phase, operation not valid in the current state."""

    code = "FAILED_PRECONDITION"


class SequenceRegressed(FailedPrecondition):
    """A push reused a sequence at or below the worker's last one that its session never sent."""

    def __init__(self, message: str, *, last_sequence: int) -> None:
        super().__init__(message)
        self.last_sequence = last_sequence


class Aborted(ParamServeError):
    """The round was aborted (deadline policy ``abort``); retry the push."""

    code = "ABORTED"


class Unauthenticated(ParamServeError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ParamServeError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(ParamServeError):
    """Message or state over a configured limit."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ParamServeError):
    """Server shutting down or restoring."""

    code = "UNAVAILABLE"


class DeadlineExceeded(ParamServeError):
    """A wait (e.g. pull for a version) ran out of time."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(ParamServeError):
    """The call ended (client gone, or a message refused by the transport) before it acted."""

    code = "CANCELLED"


class StartupRefused(Exception):
    """The daemon must not start (not an RPC error): the message says why and what to do.

    ``paramserve serve`` prints it and exits with status 1, without a traceback.
    """
