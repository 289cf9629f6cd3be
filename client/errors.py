"""Errors the SDK raises: one class per gRPC status code, carrying the server's message.

Every failed call raises a :class:`ParamServeError` subclass with ``.code`` (a
``grpc.StatusCode``) and ``.message`` (what the server said was expected and what
arrived). The classes also derive from the matching built-in exception where one
fits, so ``except ValueError`` catches an INVALID_ARGUMENT and ``except TimeoutError``
a DEADLINE_EXCEEDED.

A paramserve daemon also sends machine-readable details (a ``google.rpc.Status`` in the
call's trailers), exposed as ``.reason`` (e.g. ``"SEQUENCE_REGRESSED"``; see docs/errors.md's
table), ``.domain`` (``"paramserve.v1"``), ``.metadata`` (``{str: str}``, e.g.
``{"last_sequence": "41"}``) and ``.violations`` (``[(field, description)]``, the request
fields at fault). Errors without details (gRPC's own, or another server's) have ``reason``
and ``domain`` None and empty ``metadata`` and ``violations``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# ErrorInfo.domain of the errors a paramserve daemon sends.
DOMAIN = "paramserve.v1"


class ParamServeError(Exception):
    """A failed call: ``code`` says how, ``message`` why, ``reason`` and the rest for programs."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # Attempts the SDK made for this call (more than 1 when it resent it; see resend.py).
    attempts: int = 1

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: list[tuple[str, str]] = list(violations)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class CancelledError(ParamServeError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgumentError(ParamServeError, ValueError):
    """Malformed tensor, shape, dtype, size, unknown option, non-finite gradient."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(ParamServeError, TimeoutError):
    """The call's deadline passed (e.g. a pull waiting for a version that never came)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(ParamServeError, LookupError):
    """Unknown variable or snapshot, or no model on the server yet."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ParamServeError):
    """A model with another definition already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(ParamServeError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(ParamServeError):
    """A message or the state would exceed a configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ParamServeError):
    """Wrong phase: e.g. a sync push computed from an old version (pull and recompute)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(ParamServeError):
    """The round was aborted at its deadline; the push was not recorded and may be retried."""

    code = grpc.StatusCode.ABORTED


class InternalError(ParamServeError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(ParamServeError, ConnectionError):
    """The server is unreachable, shutting down or restoring (after the SDK's resends)."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(ParamServeError):
    """A response stream was malformed or incomplete (detected by the client)."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(ParamServeError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[ParamServeError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_for(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str | None = None,
    domain: str | None = None,
    metadata: Mapping[str, str] | None = None,
    violations: Iterable[tuple[str, str]] = (),
) -> ParamServeError:
    """The exception for a status code (the base class, with that code, for the rest)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ParamServeError(
            message,
            code=code,
            reason=reason,
            domain=domain,
            metadata=metadata,
            violations=violations,
        )
    return cls(message, reason=reason, domain=domain, metadata=metadata, violations=violations)


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carries; None if absent or inconsistent."""
    try:
        return rpc_status.from_call(error)  # type: ignore[arg-type]
    except (AttributeError, TypeError, ValueError, DecodeError):  # not a Call, or a bad Status
        return None


def from_rpc_error(error: grpc.RpcError) -> ParamServeError:
    """Convert a failed call's ``grpc.RpcError`` into a :class:`ParamServeError` with details."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[tuple[str, str]] = []
    status = rich_status(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and info is None:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return error_for(
        code or grpc.StatusCode.UNKNOWN,
        details or str(error),
        reason=info.reason if info is not None else None,
        domain=info.domain if info is not None else None,
        metadata=dict(info.metadata) if info is not None else None,
        violations=violations,
    )
