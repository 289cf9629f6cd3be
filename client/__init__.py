"""paramserve.client: the SDK workers and admins use to talk to a paramserve daemon."""

from typing import TYPE_CHECKING, Any

from paramserve.wire import DEFAULT_ADDRESS, SparseRows

from .client import Client, default_worker_id
from .compression import ErrorFeedback, Float16OverflowError
from .errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ParamServeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .results import (
    AggregationInfo,
    CreateModelResult,
    ModelDescription,
    PushResult,
    ServerStatus,
    SnapshotInfo,
    Tensors,
    TensorSpec,
    WorkerStatus,
)

if TYPE_CHECKING:
    from .remote import RemoteOptimizer

__all__ = [
    "DEFAULT_ADDRESS",
    "AbortedError",
    "AggregationInfo",
    "AlreadyExistsError",
    "CancelledError",
    "Client",
    "CreateModelResult",
    "DataLossError",
    "DeadlineExceededError",
    "ErrorFeedback",
    "FailedPreconditionError",
    "Float16OverflowError",
    "InternalError",
    "InvalidArgumentError",
    "ModelDescription",
    "NotFoundError",
    "ParamServeError",
    "PermissionDeniedError",
    "PushResult",
    "RemoteOptimizer",
    "ResourceExhaustedError",
    "ServerStatus",
    "SnapshotInfo",
    "SparseRows",
    "TensorSpec",
    "Tensors",
    "UnauthenticatedError",
    "UnavailableError",
    "WorkerStatus",
    "default_worker_id",
]


def __getattr__(name: str) -> Any:
    """``RemoteOptimizer`` on first use: it loads optim_core, which admin commands never need."""
    if name == "RemoteOptimizer":
        from .remote import RemoteOptimizer

        return RemoteOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "RemoteOptimizer"])
