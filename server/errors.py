"""Domain errors of the daemon, each naming the gRPC status code it maps to.

The store, aggregator and snapshot code raise these (plain Python, no gRPC import);
the servicer maps them to status codes in one place. Messages say what was expected
and what arrived, so a user can act on them.

Every error also carries machine-readable details, sent as a ``google.rpc.Status``
(see :mod:`paramserve.server.status`): a stable ``reason`` (UPPER_SNAKE_CASE; each class
has a default, raise sites may name a more precise one from :data:`REASONS`), string
``metadata`` (e.g. the variable, the limit and its value) and, for INVALID_ARGUMENT, the
request fields at fault (``violations``, each ``(field, description)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# ErrorInfo.domain of every error the daemon sends.
DOMAIN = "paramserve.v1"
# Longest metadata value or violation description sent; longer ones are shortened.
MAX_DETAIL_CHARS = 256

# The reasons the daemon sends: reason -> (status code, when). Stable: clients may branch on
# them. Each exception class has a default (its ``reason``), raise sites may be more precise.
REASONS: dict[str, tuple[str, str]] = {
    "INVALID_ARGUMENT": ("INVALID_ARGUMENT", "a malformed request (see the field violations)"),
    "MALFORMED_TENSOR": (
        "INVALID_ARGUMENT",
        "a tensor header or its chunks are malformed (dtype code, layout, byte_length, "
        "chunk order, incomplete payload)",
    ),
    "SHAPE_MISMATCH": ("INVALID_ARGUMENT", "a tensor's shape differs from the variable's"),
    "DTYPE_MISMATCH": ("INVALID_ARGUMENT", "a tensor's dtype differs from the variable's"),
    "NONFINITE_GRADIENT": ("INVALID_ARGUMENT", "NaN or Inf in a gradient under --nonfinite reject"),
    "SNAPSHOT_INVALID": ("INVALID_ARGUMENT", "a snapshot file fails validation"),
    "UNKNOWN_VARIABLE": (
        "NOT_FOUND",
        "a request names a variable the model lacks (INVALID_ARGUMENT for optimizer state)",
    ),
    "NO_MODEL": ("NOT_FOUND", "there is no model yet"),
    "SNAPSHOT_NOT_FOUND": ("NOT_FOUND", "no snapshot has that id"),
    "NOT_FOUND": ("NOT_FOUND", "something else does not exist"),
    "MODEL_EXISTS": ("ALREADY_EXISTS", "a model with another definition exists"),
    "STALE_BASE_VERSION": (
        "FAILED_PRECONDITION",
        "a push computed from a version the server does not have, or not the open round's",
    ),
    "SEQUENCE_REGRESSED": (
        "FAILED_PRECONDITION",
        "a push reuses a sequence at or below the worker's last that its session never sent",
    ),
    "ALREADY_IN_ROUND": (
        "FAILED_PRECONDITION",
        "the worker already pushed into the open sync round",
    ),
    "SHARD_MISMATCH": (
        "FAILED_PRECONDITION",
        "the client's view of a sharded job (shard count, this shard's index) differs from the "
        "server's, or a call meant for another kind of shard",
    ),
    "ROUND_NOT_PREPARED": (
        "FAILED_PRECONDITION",
        "a sharded round names a push this shard does not hold as prepared",
    ),
    "FAILED_PRECONDITION": ("FAILED_PRECONDITION", "any other operation invalid in this state"),
    "ROUND_ABORTED": ("ABORTED", "the push's round was aborted; retry with the same sequence"),
    "ROUND_OUT_OF_ORDER": (
        "ABORTED",
        "a sharded round's decision arrived before the one it follows; apply that one first",
    ),
    "LIMIT_EXCEEDED": ("RESOURCE_EXHAUSTED", "a request or the state is over a --max-* limit"),
    "SHUTTING_DOWN": ("UNAVAILABLE", "the server is draining"),
    "DEADLINE_EXCEEDED": ("DEADLINE_EXCEEDED", "a wait ran out of time"),
    "CANCELLED": ("CANCELLED", "the call ended before the request was acted on"),
    "MISSING_TOKEN": ("UNAUTHENTICATED", "no bearer token was sent"),
    "UNKNOWN_TOKEN": ("UNAUTHENTICATED", "the bearer token is not one of this server's"),
    "UNAUTHENTICATED": ("UNAUTHENTICATED", "any other authentication failure"),
    "ADMIN_ONLY": ("PERMISSION_DENIED", "a worker token on an admin-only method"),
    "PERMISSION_DENIED": ("PERMISSION_DENIED", "any other refusal"),
    "INTERNAL": ("INTERNAL", "an unexpected server error (logged on the server, not described)"),
}


def _short(text: object) -> str:
    """``text`` as a string of at most :data:`MAX_DETAIL_CHARS` characters."""
    text = str(text)
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return text[: MAX_DETAIL_CHARS - 3] + "..."


class ParamServeError(Exception):
    """Base class; ``code`` is the name of a ``grpc.StatusCode`` member.

    ``reason`` (a key of :data:`REASONS`), ``metadata`` (strings) and ``violations``
    (``(field, description)`` pairs naming request fields at fault) are the machine-readable
    details sent with the message.
    """

    code = "INTERNAL"
    reason = "INTERNAL"

    def __init__(
        self,
        message: str = "",
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = {}
        self.violations: list[tuple[str, str]] = []
        self.add_details(metadata=metadata, violations=violations)

    def add_details(
        self,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        violations: Iterable[tuple[str, str]] = (),
    ) -> ParamServeError:
        """Set the reason, add metadata and violations (values become short strings); self."""
        if reason is not None:
            self.reason = reason
        for key, value in (metadata or {}).items():
            self.metadata[str(key)] = _short(value)
        self.violations += [(str(f), _short(d)) for f, d in violations]
        return self

    def copy(self) -> ParamServeError:
        """A new exception with this class, message and details (for another thread)."""
        error = type(self).__new__(type(self))
        Exception.__init__(error, *self.args)
        error.__dict__.update(self.__dict__)
        error.metadata = dict(self.metadata)
        error.violations = list(self.violations)
        return error


class InvalidArgument(ParamServeError):
    """Malformed tensor, shape, dtype, size, unknown option, non-finite gradient."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFound(ParamServeError):
    """Unknown variable, snapshot, or no model yet."""

    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(ParamServeError):
    """A model already exists with another definition."""

    code = "ALREADY_EXISTS"
    reason = "MODEL_EXISTS"


class FailedPrecondition(ParamServeError):
    """Push too stale, wrong phase, operation not valid in the current state."""

    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class SequenceRegressed(FailedPrecondition):
    """A push reused a sequence at or below the worker's last one that its session never sent."""

    reason = "SEQUENCE_REGRESSED"

    def __init__(
        self, message: str, *, last_sequence: int, metadata: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(message, metadata={**(metadata or {}), "last_sequence": last_sequence})
        self.last_sequence = last_sequence


class Aborted(ParamServeError):
    """The round was aborted (deadline policy ``abort``); retry the push."""

    code = "ABORTED"
    reason = "ROUND_ABORTED"


class Unauthenticated(ParamServeError):
    """No token, or one this server does not know."""

    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDenied(ParamServeError):
    """A token whose role may not call the method."""

    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class ResourceExhausted(ParamServeError):
    """Message or state over a configured limit."""

    code = "RESOURCE_EXHAUSTED"
    reason = "LIMIT_EXCEEDED"


class Unavailable(ParamServeError):
    """Server shutting down or restoring."""

    code = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"


class DeadlineExceeded(ParamServeError):
    """A wait (e.g. pull for a version) ran out of time."""

    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class Cancelled(ParamServeError):
    """The call ended (client gone, or a message refused by the transport) before it acted."""

    code = "CANCELLED"
    reason = "CANCELLED"


def limit_exceeded(
    message: str, *, limit: str, limit_value: int, requested: int, **metadata: object
) -> ResourceExhausted:
    """A ResourceExhausted naming the setting (``limit``), its value and what was asked for."""
    return ResourceExhausted(
        message,
        metadata={"limit": limit, "limit_value": limit_value, "requested": requested, **metadata},
    )


class StartupRefused(Exception):
    """The daemon must not start (not an RPC error): the message says why and what to do.

    ``paramserve serve`` prints it and exits with status 1, without a traceback.
    """
