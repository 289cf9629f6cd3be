"""Machine-readable error details: every error family carries a google.rpc.Status.

Each test makes a real call to a real server (raw generated stubs, as the other transport
tests do), decodes the ``grpc-status-details-bin`` trailer with grpcio-status, and checks
that its code and message equal the call's, that its ErrorInfo has the documented reason
(domain "paramserve.v1") and metadata, and, for INVALID_ARGUMENT, the BadRequest field at
fault. The last tests read the same details through the SDK's exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from paramserve import wire
from paramserve.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from paramserve.client.errors import from_rpc_error
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.models.tiny import grads_for, initial_variables
from tests.support.wire import TIMEOUT_S, push_requests

# The documented reasons and their status codes (docs/errors.md): the contract pinned here.
CATALOGUE = {
    "INVALID_ARGUMENT": "INVALID_ARGUMENT",
    "MALFORMED_TENSOR": "INVALID_ARGUMENT",
    "SHAPE_MISMATCH": "INVALID_ARGUMENT",
    "DTYPE_MISMATCH": "INVALID_ARGUMENT",
    "NONFINITE_GRADIENT": "INVALID_ARGUMENT",
    "SNAPSHOT_INVALID": "INVALID_ARGUMENT",
    "UNKNOWN_VARIABLE": "NOT_FOUND",  # INVALID_ARGUMENT for optimizer-state names
    "NO_MODEL": "NOT_FOUND",
    "SNAPSHOT_NOT_FOUND": "NOT_FOUND",
    "NOT_FOUND": "NOT_FOUND",
    "MODEL_EXISTS": "ALREADY_EXISTS",
    "STALE_BASE_VERSION": "FAILED_PRECONDITION",
    "SEQUENCE_REGRESSED": "FAILED_PRECONDITION",
    "ALREADY_IN_ROUND": "FAILED_PRECONDITION",
    "FAILED_PRECONDITION": "FAILED_PRECONDITION",
    "ROUND_ABORTED": "ABORTED",
    "LIMIT_EXCEEDED": "RESOURCE_EXHAUSTED",
    "SHUTTING_DOWN": "UNAVAILABLE",
    "DEADLINE_EXCEEDED": "DEADLINE_EXCEEDED",
    "CANCELLED": "CANCELLED",
    "MISSING_TOKEN": "UNAUTHENTICATED",
    "UNKNOWN_TOKEN": "UNAUTHENTICATED",
    "UNAUTHENTICATED": "UNAUTHENTICATED",
    "ADMIN_ONLY": "PERMISSION_DENIED",
    "PERMISSION_DENIED": "PERMISSION_DENIED",
    "INTERNAL": "INTERNAL",
    "SHARD_MISMATCH": "FAILED_PRECONDITION",
    "ROUND_NOT_PREPARED": "FAILED_PRECONDITION",
    "ROUND_OUT_OF_ORDER": "ABORTED",
}
ADMIN = "admin-token-for-error-details"
WORKER = "worker-token-for-error-details"


@dataclass
class Details:
    """A failed call and the google.rpc.Status it carried, unpacked."""

    error: grpc.RpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    violations: list[tuple[str, str]]

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.info.metadata)


def details_of(code: grpc.StatusCode, call: Callable[[], object]) -> Details:
    """Run ``call``; it must fail with ``code`` and a decodable, consistent google.rpc.Status."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    status = rpc_status.from_call(error)  # also checks code and message against the call's
    assert status is not None, f"no google.rpc.Status with {code}: {error.details()}"
    assert status.code == code.value[0]
    assert status.message == error.details()
    infos, violations = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        else:
            assert detail.Is(error_details_pb2.BadRequest.DESCRIPTOR), detail.type_url
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    assert len(infos) == 1, status
    (info,) = infos
    assert info.domain == "paramserve.v1"
    assert info.reason in CATALOGUE, info.reason
    if info.reason != "UNKNOWN_VARIABLE":
        assert CATALOGUE[info.reason] == code.name, (info.reason, code)
    if violations:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    return Details(error, status, info, violations)


def test_catalogue_matches_the_server():
    from paramserve.server import errors

    assert {reason: code for reason, (code, _) in errors.REASONS.items()} == CATALOGUE
    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    defaults = {c.reason for c in classes if issubclass(c, errors.ParamServeError)}
    assert defaults <= set(CATALOGUE)  # every class's default reason is documented


def _raw_push(harness, items):
    return lambda: harness.stub.Push(iter(items), timeout=TIMEOUT_S)


def _push_with_session(harness, *, sequence: int, session: str):
    items = push_requests(grads_for(), sequence=sequence)
    items[0].header.session = session
    return harness.stub.Push(iter(items), timeout=TIMEOUT_S)


# -- INVALID_ARGUMENT ----------------------------------------------------------------------


def test_invalid_argument_names_the_field(harness):
    grads = {"w": np.ones((3, 2), np.float32)}
    got = details_of(grpc.StatusCode.INVALID_ARGUMENT, lambda: harness.push(grads))
    assert got.reason == "SHAPE_MISMATCH"
    assert got.metadata == {"variable": "w", "expected": "[2, 3]", "got": "[3, 2]"}
    assert [field for field, _ in got.violations] == ["tensors[w].shape"]

    grads = {"w": np.ones((2, 3), np.float64)}
    got = details_of(grpc.StatusCode.INVALID_ARGUMENT, lambda: harness.push(grads))
    assert got.reason == "DTYPE_MISMATCH"
    assert got.metadata == {"variable": "w", "expected": "float32", "got": "float64"}
    assert [field for field, _ in got.violations] == ["tensors[w].dtype"]

    got = details_of(
        grpc.StatusCode.INVALID_ARGUMENT, lambda: harness.push(grads_for(), worker_id="")
    )
    assert got.reason == "INVALID_ARGUMENT"
    assert [field for field, _ in got.violations] == ["worker_id"]

    request = pb.SetHyperparametersRequest(values={"no_such_option": 1.0})
    got = details_of(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: harness.stub.SetHyperparameters(request, timeout=TIMEOUT_S),
    )
    assert [field for field, _ in got.violations] == ["values[no_such_option]"]


def test_invalid_argument_reasons_without_a_single_field(harness):
    grads = grads_for()
    grads["b"][1] = np.nan
    got = details_of(grpc.StatusCode.INVALID_ARGUMENT, lambda: harness.push(grads))
    assert got.reason == "NONFINITE_GRADIENT"
    assert got.metadata == {"variable": "b", "policy": "reject"}

    header = wire.header_for("w", grads_for()["w"])
    header.dtype = 99
    items = push_requests({"w": grads_for()["w"]}, headers=[header])
    got = details_of(grpc.StatusCode.INVALID_ARGUMENT, _raw_push(harness, items))
    assert got.reason == "MALFORMED_TENSOR"


def test_invalid_snapshot_upload(start_server, tmp_path):
    h = start_server(checkpoint_dir=tmp_path / "ckpt")
    items = [
        pb.UploadSnapshotRequest(header=pb.UploadSnapshotHeader(size_bytes=64)),
        pb.UploadSnapshotRequest(chunk=pb.FileChunk(offset=0, data=b"\0" * 64)),
        pb.UploadSnapshotRequest(end=tpb.StreamEnd()),
    ]
    got = details_of(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: h.stub.UploadSnapshot(iter(items), timeout=TIMEOUT_S),
    )
    assert got.reason == "SNAPSHOT_INVALID"


# -- NOT_FOUND, ALREADY_EXISTS -------------------------------------------------------------


def test_not_found_reasons(start_server, tmp_path):
    h = start_server(checkpoint_dir=tmp_path / "ckpt")
    describe = lambda: h.stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)  # noqa: E731
    assert details_of(grpc.StatusCode.NOT_FOUND, describe).reason == "NO_MODEL"
    got = details_of(grpc.StatusCode.NOT_FOUND, lambda: h.push(grads_for()))
    assert got.reason == "NO_MODEL"

    h.create()
    got = details_of(grpc.StatusCode.NOT_FOUND, lambda: h.push({"nope": np.ones(2, np.float32)}))
    assert (got.reason, got.metadata) == ("UNKNOWN_VARIABLE", {"variable": "nope"})
    got = details_of(grpc.StatusCode.NOT_FOUND, lambda: h.pull(names=["nope"]))
    assert (got.reason, got.metadata) == ("UNKNOWN_VARIABLE", {"variable": "nope"})

    bogus = "snap-000000000042-20260101T000000000000Z"
    request = pb.RestoreSnapshotRequest(id=bogus)
    got = details_of(
        grpc.StatusCode.NOT_FOUND, lambda: h.stub.RestoreSnapshot(request, timeout=TIMEOUT_S)
    )
    assert (got.reason, got.metadata) == ("SNAPSHOT_NOT_FOUND", {"snapshot_id": bogus})


def test_already_exists(harness):
    variables = initial_variables()
    variables["w"] = np.zeros((3, 3), np.float32)
    got = details_of(grpc.StatusCode.ALREADY_EXISTS, lambda: harness.create(variables))
    assert (got.reason, got.metadata) == ("MODEL_EXISTS", {"model_name": "m"})


# -- FAILED_PRECONDITION, ABORTED ----------------------------------------------------------


def test_stale_base_version(start_server):
    h = start_server(mode="sync", replicas=1)
    h.create()
    h.push(grads_for(), base_version=0)
    got = details_of(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: h.push(grads_for(), sequence=2, base_version=0),
    )
    assert got.reason == "STALE_BASE_VERSION"
    assert got.metadata == {"base_version": "0", "version": "1"}


def test_sequence_regressed_names_the_last_sequence(harness):
    _push_with_session(harness, sequence=1, session="first")
    _push_with_session(harness, sequence=2, session="first")
    got = details_of(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: _push_with_session(harness, sequence=1, session="second"),
    )
    assert got.reason == "SEQUENCE_REGRESSED"
    assert got.metadata == {"worker_id": "w0", "sequence": "1", "last_sequence": "2"}


def test_aborted_round(start_server):
    h = start_server(mode="sync", replicas=2, round_timeout_s=0.3, deadline_policy="abort")
    h.create()
    got = details_of(grpc.StatusCode.ABORTED, lambda: h.push(grads_for(), worker_id="a"))
    assert got.reason == "ROUND_ABORTED"
    assert got.metadata["version"] == "0"


# -- RESOURCE_EXHAUSTED --------------------------------------------------------------------


def test_limit_exceeded_names_the_limit(start_server):
    h = start_server(max_tensor_bytes=64)
    h.create()
    header = tpb.TensorHeader(
        name="w",
        dtype=tpb.FLOAT32,
        shape=[2, 3],
        layout=tpb.LAYOUT_SPARSE_ROWS,
        num_rows=100,
        byte_length=2000,
    )
    items = push_requests({}, headers=[header])
    got = details_of(grpc.StatusCode.RESOURCE_EXHAUSTED, _raw_push(h, items))
    assert got.reason == "LIMIT_EXCEEDED"
    assert got.metadata == {
        "limit": "max_tensor_bytes",
        "limit_value": "64",
        "requested": "2000",
        "variable": "w",
    }


def test_transport_limit_has_no_details_and_the_sdk_copes(start_server):
    h = start_server(max_message_bytes=1 << 20)
    big = {"big": np.zeros(1 << 19, np.float32)}
    h.create(big, chunk_bytes=256 << 10)
    items = push_requests(big)
    items = [items[0], pb.PushRequest(chunk=tpb.TensorChunk(data=big["big"].tobytes())), items[-1]]
    with pytest.raises(grpc.RpcError) as raised:
        h.stub.Push(iter(items), timeout=TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rpc_status.from_call(raised.value) is None  # gRPC's own refusal: no details
    error = from_rpc_error(raised.value)
    assert isinstance(error, ResourceExhaustedError)
    assert error.message == raised.value.details()
    assert (error.reason, error.domain, error.metadata, error.violations) == (None, None, {}, [])


# -- UNAUTHENTICATED, PERMISSION_DENIED ----------------------------------------------------


def test_auth_refusals(start_server):
    h = start_server(admin_tokens=(ADMIN,), worker_tokens=(WORKER,))
    status = pb.GetStatusRequest()

    def get_status(metadata=()):
        return lambda: h.stub.GetStatus(status, timeout=TIMEOUT_S, metadata=metadata)

    got = details_of(grpc.StatusCode.UNAUTHENTICATED, get_status())
    assert (got.reason, got.metadata) == ("MISSING_TOKEN", {"method": "GetStatus"})
    got = details_of(
        grpc.StatusCode.UNAUTHENTICATED, get_status((("authorization", "Bearer nope"),))
    )
    assert (got.reason, got.metadata) == ("UNKNOWN_TOKEN", {"method": "GetStatus"})
    got = details_of(
        grpc.StatusCode.PERMISSION_DENIED,
        lambda: h.stub.DeleteModel(
            pb.DeleteModelRequest(),
            timeout=TIMEOUT_S,
            metadata=(("authorization", f"Bearer {WORKER}"),),
        ),
    )
    assert got.reason == "ADMIN_ONLY"
    assert got.metadata == {"method": "DeleteModel", "role": "worker"}


# -- UNAVAILABLE, INTERNAL -----------------------------------------------------------------


def test_unavailable_while_draining(harness):
    harness.server.core.accepting.clear()
    got = details_of(grpc.StatusCode.UNAVAILABLE, lambda: harness.push(grads_for()))
    assert got.reason == "SHUTTING_DOWN"


def test_internal_error_has_a_reason_but_no_internals(harness, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(harness.server.core.store, "read_with", broken)
    got = details_of(grpc.StatusCode.INTERNAL, lambda: harness.pull())
    assert got.status.message == "internal error"
    assert (got.reason, got.metadata, got.violations) == ("INTERNAL", {"method": "Pull"}, [])
    assert "secret" not in got.status.SerializeToString().decode("latin-1")


def test_long_messages_are_shortened_so_the_details_arrive(start_server):
    # Twenty 1000-character names: the NOT_FOUND message lists them all (20 KB), over what
    # a client accepts in trailers (8 KiB) once the Status repeats it.
    h = start_server()
    names = [f"v{i:02d}" + "x" * 997 for i in range(20)]
    h.create({n: np.zeros(1, np.float32) for n in names})
    unknown = "u" * 1000
    got = details_of(grpc.StatusCode.NOT_FOUND, lambda: h.push({unknown: np.ones(1, np.float32)}))
    assert got.reason == "UNKNOWN_VARIABLE"
    assert got.metadata["variable"] == unknown[:253] + "..."
    assert got.status.message.startswith(f"unknown variable {unknown!r}")
    assert got.status.message.endswith("more characters]")


# -- the SDK ------------------------------------------------------------------------------


def test_sdk_exposes_reason_metadata_and_violations(harness):
    with Client(harness.server.address, worker_id="sdk") as client:
        with pytest.raises(InvalidArgumentError) as bad_shape:
            client.push({"w": np.ones((3, 2), np.float32)})
        with pytest.raises(NotFoundError) as unknown:
            client.pull(["nope"])
    error = bad_shape.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(error) == f"INVALID_ARGUMENT: {error.message}"
    assert "[3, 2]" in error.message
    assert (error.reason, error.domain) == ("SHAPE_MISMATCH", "paramserve.v1")
    assert error.metadata == {"variable": "w", "expected": "[2, 3]", "got": "[3, 2]"}
    assert [field for field, _ in error.violations] == ["tensors[w].shape"]
    assert (unknown.value.reason, unknown.value.metadata) == (
        "UNKNOWN_VARIABLE",
        {"variable": "nope"},
    )


def test_sdk_sequence_regression_carries_the_last_sequence(harness):
    with Client(harness.server.address, worker_id="shared") as first:
        first.push(grads_for())
        first.push(grads_for())
    second = Client(harness.server.address, worker_id="shared")
    with second, pytest.raises(FailedPreconditionError) as raised:
        second.push(grads_for(), sequence=1)
    assert raised.value.reason == "SEQUENCE_REGRESSED"
    assert raised.value.metadata["last_sequence"] == "2"


def test_sdk_unauthenticated(start_server):
    h = start_server(admin_tokens=(ADMIN,), worker_tokens=(WORKER,))
    client = Client(h.server.address, token="wrong", wait_for_ready=False)
    with client, pytest.raises(UnauthenticatedError) as raised:
        client.status()
    assert raised.value.reason == "UNKNOWN_TOKEN"
    assert raised.value.metadata == {"method": "GetStatus"}
