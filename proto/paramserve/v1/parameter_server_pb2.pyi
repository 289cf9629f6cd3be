from paramserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PULL_SCOPE_WEIGHTS: _ClassVar[PullScope]
    PULL_SCOPE_OPTIMIZER_STATE: _ClassVar[PullScope]
PULL_SCOPE_WEIGHTS: PullScope
PULL_SCOPE_OPTIMIZER_STATE: PullScope

class CreateModelHeader(_message.Message):
    __slots__ = ("model_name", "optimizer_json", "variables")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    optimizer_json: str
    variables: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorHeader]
    def __init__(self, model_name: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., variables: _Optional[_Iterable[_Union[_tensor_pb2.TensorHeader, _Mapping]]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: CreateModelHeader
    chunk: _tensor_pb2.TensorChunk
    end: _tensor_pb2.StreamEnd
    def __init__(self, header: _Optional[_Union[CreateModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., end: _Optional[_Union[_tensor_pb2.StreamEnd, _Mapping]] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("created", "version", "values_match")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUES_MATCH_FIELD_NUMBER: _ClassVar[int]
    created: bool
    version: int
    values_match: bool
    def __init__(self, created: _Optional[bool] = ..., version: _Optional[int] = ..., values_match: _Optional[bool] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model_name", "variables", "optimizer_json", "hyperparameters", "version", "optimizer_variables", "aggregation")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    variables: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorHeader]
    optimizer_json: str
    hyperparameters: _containers.ScalarMap[str, float]
    version: int
    optimizer_variables: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorHeader]
    aggregation: AggregationInfo
    def __init__(self, model_name: _Optional[str] = ..., variables: _Optional[_Iterable[_Union[_tensor_pb2.TensorHeader, _Mapping]]] = ..., optimizer_json: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ..., version: _Optional[int] = ..., optimizer_variables: _Optional[_Iterable[_Union[_tensor_pb2.TensorHeader, _Mapping]]] = ..., aggregation: _Optional[_Union[AggregationInfo, _Mapping]] = ...) -> None: ...

class AggregationInfo(_message.Message):
    __slots__ = ("mode", "replicas", "reduction", "round_timeout_s", "deadline_policy", "max_staleness")
    MODE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    replicas: int
    reduction: str
    round_timeout_s: float
    deadline_policy: str
    max_staleness: int
    def __init__(self, mode: _Optional[str] = ..., replicas: _Optional[int] = ..., reduction: _Optional[str] = ..., round_timeout_s: _Optional[float] = ..., deadline_policy: _Optional[str] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("worker_id", "sequence", "base_version", "tensors", "session", "wire_dtype", "prepare")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    sequence: int
    base_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorHeader]
    session: str
    wire_dtype: _tensor_pb2.DType
    prepare: bool
    def __init__(self, worker_id: _Optional[str] = ..., sequence: _Optional[int] = ..., base_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorHeader, _Mapping]]] = ..., session: _Optional[str] = ..., wire_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., prepare: _Optional[bool] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk", "end", "chunk_header", "chunk_end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CHUNK_HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_END_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: _tensor_pb2.TensorChunk
    end: _tensor_pb2.StreamEnd
    chunk_header: PushHeader
    chunk_end: _tensor_pb2.StreamEnd
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., end: _Optional[_Union[_tensor_pb2.StreamEnd, _Mapping]] = ..., chunk_header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk_end: _Optional[_Union[_tensor_pb2.StreamEnd, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("duplicate", "version", "contributors", "applied", "reads_merged_items")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    READS_MERGED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    version: int
    contributors: int
    applied: bool
    reads_merged_items: bool
    def __init__(self, duplicate: _Optional[bool] = ..., version: _Optional[int] = ..., contributors: _Optional[int] = ..., applied: _Optional[bool] = ..., reads_merged_items: _Optional[bool] = ...) -> None: ...

class InlineTensor(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: _tensor_pb2.TensorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("push", "gradients", "pull")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    push: PushHeader
    gradients: _containers.RepeatedCompositeFieldContainer[InlineTensor]
    pull: PullRequest
    def __init__(self, push: _Optional[_Union[PushHeader, _Mapping]] = ..., gradients: _Optional[_Iterable[_Union[InlineTensor, _Mapping]]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("push", "version", "weights")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    push: PushResponse
    version: int
    weights: _containers.RepeatedCompositeFieldContainer[InlineTensor]
    def __init__(self, push: _Optional[_Union[PushResponse, _Mapping]] = ..., version: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[InlineTensor, _Mapping]]] = ...) -> None: ...

class RowSelection(_message.Message):
    __slots__ = ("name", "rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("names", "rows", "min_version", "scope", "worker_id", "wire_dtype", "packed_chunks", "merged_items", "stripe", "stripes")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PACKED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MERGED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_FIELD_NUMBER: _ClassVar[int]
    STRIPES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[RowSelection]
    min_version: int
    scope: PullScope
    worker_id: str
    wire_dtype: _tensor_pb2.DType
    packed_chunks: bool
    merged_items: bool
    stripe: int
    stripes: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[RowSelection, _Mapping]]] = ..., min_version: _Optional[int] = ..., scope: _Optional[_Union[PullScope, str]] = ..., worker_id: _Optional[str] = ..., wire_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., packed_chunks: _Optional[bool] = ..., merged_items: _Optional[bool] = ..., stripe: _Optional[int] = ..., stripes: _Optional[int] = ...) -> None: ...

class SetOptimizerStateResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SetHyperparametersRequest(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SetHyperparametersResponse(_message.Message):
    __slots__ = ("hyperparameters", "optimizer_json")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    hyperparameters: _containers.ScalarMap[str, float]
    optimizer_json: str
    def __init__(self, hyperparameters: _Optional[_Mapping[str, float]] = ..., optimizer_json: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "last_sequence", "pushes", "seconds_since_seen", "pending", "last_base_version", "duplicates")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LAST_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    last_sequence: int
    pushes: int
    seconds_since_seen: float
    pending: bool
    last_base_version: int
    duplicates: int
    def __init__(self, worker_id: _Optional[str] = ..., last_sequence: _Optional[int] = ..., pushes: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ..., pending: _Optional[bool] = ..., last_base_version: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("server_version", "has_model", "version", "rounds_completed", "rounds_aborted", "rounds_partial", "workers", "pending_pushes", "aggregation", "device", "uptime_s", "serving", "received_bytes", "sent_bytes", "shard_index", "shards", "last_round")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    HAS_MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_ABORTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_PUSHES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    has_model: bool
    version: int
    rounds_completed: int
    rounds_aborted: int
    rounds_partial: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    pending_pushes: int
    aggregation: AggregationInfo
    device: str
    uptime_s: float
    serving: bool
    received_bytes: int
    sent_bytes: int
    shard_index: int
    shards: int
    last_round: RoundDecision
    def __init__(self, server_version: _Optional[str] = ..., has_model: _Optional[bool] = ..., version: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., rounds_aborted: _Optional[int] = ..., rounds_partial: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., pending_pushes: _Optional[int] = ..., aggregation: _Optional[_Union[AggregationInfo, _Mapping]] = ..., device: _Optional[str] = ..., uptime_s: _Optional[float] = ..., serving: _Optional[bool] = ..., received_bytes: _Optional[int] = ..., sent_bytes: _Optional[int] = ..., shard_index: _Optional[int] = ..., shards: _Optional[int] = ..., last_round: _Optional[_Union[RoundDecision, _Mapping]] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("id", "version", "size_bytes", "created_at", "cut")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    size_bytes: int
    created_at: str
    cut: SnapshotCut
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., size_bytes: _Optional[int] = ..., created_at: _Optional[str] = ..., cut: _Optional[_Union[SnapshotCut, _Mapping]] = ...) -> None: ...

class SnapshotCut(_message.Message):
    __slots__ = ("cut_id", "shard_index", "shards")
    CUT_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    cut_id: str
    shard_index: int
    shards: int
    def __init__(self, cut_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., shards: _Optional[int] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("cut", "at_version")
    CUT_FIELD_NUMBER: _ClassVar[int]
    AT_VERSION_FIELD_NUMBER: _ClassVar[int]
    cut: SnapshotCut
    at_version: int
    def __init__(self, cut: _Optional[_Union[SnapshotCut, _Mapping]] = ..., at_version: _Optional[int] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class RestoreSnapshotRequest(_message.Message):
    __slots__ = ("id", "validate_only")
    ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    id: str
    validate_only: bool
    def __init__(self, id: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class RestoreSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotInfo
    def __init__(self, snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ...) -> None: ...

class DownloadSnapshotRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class UploadSnapshotHeader(_message.Message):
    __slots__ = ("size_bytes", "restore", "reshard")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    RESHARD_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    restore: bool
    reshard: ReshardUpload
    def __init__(self, size_bytes: _Optional[int] = ..., restore: _Optional[bool] = ..., reshard: _Optional[_Union[ReshardUpload, _Mapping]] = ...) -> None: ...

class ReshardUpload(_message.Message):
    __slots__ = ("manifest", "shards", "shard_index", "cut_id", "split_threshold_bytes")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    CUT_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_THRESHOLD_BYTES_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    shards: int
    shard_index: int
    cut_id: str
    split_threshold_bytes: int
    def __init__(self, manifest: _Optional[bytes] = ..., shards: _Optional[int] = ..., shard_index: _Optional[int] = ..., cut_id: _Optional[str] = ..., split_threshold_bytes: _Optional[int] = ...) -> None: ...

class UploadSnapshotRequest(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: UploadSnapshotHeader
    chunk: FileChunk
    end: _tensor_pb2.StreamEnd
    def __init__(self, header: _Optional[_Union[UploadSnapshotHeader, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ..., end: _Optional[_Union[_tensor_pb2.StreamEnd, _Mapping]] = ...) -> None: ...

class UploadSnapshotResponse(_message.Message):
    __slots__ = ("snapshot", "restored")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotInfo
    restored: bool
    def __init__(self, snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ..., restored: _Optional[bool] = ...) -> None: ...

class RoundMember(_message.Message):
    __slots__ = ("worker_id", "sequence", "applied")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    sequence: int
    applied: bool
    def __init__(self, worker_id: _Optional[str] = ..., sequence: _Optional[int] = ..., applied: _Optional[bool] = ...) -> None: ...

class RoundDecision(_message.Message):
    __slots__ = ("version", "members")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    members: _containers.RepeatedCompositeFieldContainer[RoundMember]
    def __init__(self, version: _Optional[int] = ..., members: _Optional[_Iterable[_Union[RoundMember, _Mapping]]] = ...) -> None: ...

class CommitRoundRequest(_message.Message):
    __slots__ = ("worker_id", "sequence", "session", "base_version", "skipped")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    sequence: int
    session: str
    base_version: int
    skipped: bool
    def __init__(self, worker_id: _Optional[str] = ..., sequence: _Optional[int] = ..., session: _Optional[str] = ..., base_version: _Optional[int] = ..., skipped: _Optional[bool] = ...) -> None: ...

class CommitRoundResponse(_message.Message):
    __slots__ = ("push", "decision")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    push: PushResponse
    decision: RoundDecision
    def __init__(self, push: _Optional[_Union[PushResponse, _Mapping]] = ..., decision: _Optional[_Union[RoundDecision, _Mapping]] = ...) -> None: ...

class ApplyRoundRequest(_message.Message):
    __slots__ = ("decision",)
    DECISION_FIELD_NUMBER: _ClassVar[int]
    decision: RoundDecision
    def __init__(self, decision: _Optional[_Union[RoundDecision, _Mapping]] = ...) -> None: ...

class ApplyRoundResponse(_message.Message):
    __slots__ = ("version", "applied")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    version: int
    applied: bool
    def __init__(self, version: _Optional[int] = ..., applied: _Optional[bool] = ...) -> None: ...

class HoldUpdatesRequest(_message.Message):
    __slots__ = ("hold_s",)
    HOLD_S_FIELD_NUMBER: _ClassVar[int]
    hold_s: float
    def __init__(self, hold_s: _Optional[float] = ...) -> None: ...

class HoldUpdatesResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...
