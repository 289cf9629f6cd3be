"""Errors the SDK raises: one class per gRPC status code, carrying the server's message.

Every failed call raises a :class:`ParamServeError` subclass with ``.code`` (a
``grpc.StatusCode``) and ``.message`` (what the server said was expected and what
arrived). The classes also derive from the matching built-in exception where one
fits, so ``except ValueError`` catches an INVALID_ARGUMENT and ``except TimeoutError``
a DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import grpc


class ParamServeError(Exception):
    """A call to the parameter server failed; ``code`` says how, ``message`` says why."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

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
    """The server is unreachable, shutting down or restoring (after the automatic retries)."""

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


def error_for(code: grpc.StatusCode, message: str) -> ParamServeError:
    """The exception for a status code (the base class, with that code, for the rest)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ParamServeError(message, code=code)
    return cls(message)


def from_rpc_error(error: grpc.RpcError) -> ParamServeError:
    """Convert a failed call's ``grpc.RpcError`` into the matching :class:`ParamServeError`."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    return error_for(code or grpc.StatusCode.UNKNOWN, details or str(error))
