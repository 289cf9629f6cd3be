"""Every failed call's status: code, message and a ``google.rpc.Status`` with its details.

This is the one place an exception becomes what the client receives and what the metrics
count. :func:`status_of` is its code: a :class:`~paramserve.server.errors.ParamServeError`
keeps its own, a malformed tensor stream (``WireError``) is INVALID_ARGUMENT, anything else
INTERNAL. :func:`grpc_status` is the whole status, built on it: the error's message (for
INTERNAL only "internal error"; the exception is logged here with its traceback). The
details, encoded by
grpcio-status in the ``grpc-status-details-bin`` trailer, are always an ``ErrorInfo``
(``reason``, ``domain`` "paramserve.v1", ``metadata``) and, when the error names request
fields at fault, a ``BadRequest`` with one field violation each.
"""

from __future__ import annotations

import base64
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from paramserve.wire import WireError

from .errors import DOMAIN, InvalidArgument, ParamServeError

logger = logging.getLogger(__name__)

# Clients refuse trailing metadata over 8 KiB by default (gRPC's soft limit), and the
# message travels twice: as grpc-message and inside the Status. Longer messages are cut.
TRAILER_BUDGET_BYTES = 6 << 10
INTERNAL_MESSAGE = "internal error"


def domain_error(exc: BaseException, method: str) -> ParamServeError:
    """``exc`` as the domain error it is reported as (unexpected ones are logged here)."""
    if isinstance(exc, ParamServeError) and _code(exc) not in (None, grpc.StatusCode.OK):
        return exc
    if isinstance(exc, WireError):
        return InvalidArgument(str(exc), reason="MALFORMED_TENSOR")
    logger.error("%s failed unexpectedly", method, exc_info=exc)
    return ParamServeError(INTERNAL_MESSAGE, reason="INTERNAL", metadata={"method": method})


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception is answered with, and counted by (nothing is logged)."""
    if isinstance(exc, ParamServeError):
        code = _code(exc)
        if code not in (None, grpc.StatusCode.OK):
            return code
    elif isinstance(exc, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def grpc_status(exc: BaseException, method: str) -> grpc.Status:
    """The status a call that raised ``exc`` ends with, details included."""
    error = domain_error(exc, method)
    code = status_of(error)
    message = str(error) or type(error).__name__
    details = [_packed(_error_info(error))]
    if error.violations:
        details.append(_packed(_bad_request(error)))
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    keep = len(message)
    while _trailer_bytes(status) > TRAILER_BUDGET_BYTES and keep > 64:
        keep = keep * 3 // 4
        status.message = f"{message[:keep]} ... [{len(message) - keep} more characters]"
    return rpc_status.to_status(status)


def _code(error: ParamServeError) -> grpc.StatusCode | None:
    code = getattr(grpc.StatusCode, error.code, None)
    return code if isinstance(code, grpc.StatusCode) else None


def _error_info(error: ParamServeError) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(
        reason=error.reason, domain=DOMAIN, metadata=dict(error.metadata)
    )


def _bad_request(error: ParamServeError) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in error.violations
        ]
    )


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _trailer_bytes(status: status_pb2.Status) -> int:
    """About what the status takes in trailers: grpc-message (percent-encoded) plus the
    base64 Status in grpc-status-details-bin."""
    text = status.message.encode()
    encoded = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text)
    return encoded + len(base64.b64encode(status.SerializeToString()))
