"""paramserve.client: the SDK workers and admins use to talk to a paramserve daemon."""

from paramserve.wire import DEFAULT_ADDRESS, SparseRows

from .client import Client, default_worker_id
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
from .remote import RemoteOptimizer
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
    "FailedPreconditionError",
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
