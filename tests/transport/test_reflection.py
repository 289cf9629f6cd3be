"""Server reflection, v1 and v1alpha: both list the services and resolve files and symbols.

The v1 client here is built from what the server describes: its first call (v1 method,
v1alpha-encoded messages, which are the same on the wire) fetches the v1 service's file,
which must match the canonical ``grpc/reflection/v1/reflection.proto``; the later calls
use message classes made from that file.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from paramserve.v1 import parameter_server_pb2 as pb
from tests.support.wire import TIMEOUT_S

SERVICE = "paramserve.v1.ParameterServer"
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
EXPECTED_SERVICES = {SERVICE, "grpc.health.v1.Health", V1, V1ALPHA}
# grpc/reflection/v1/reflection.proto (grpc-proto): message -> {field: (number, type)}.
S, I32, B, M = (
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
)
CANONICAL_V1 = {
    "ServerReflectionRequest": {
        "host": (1, S),
        "file_by_filename": (3, S),
        "file_containing_symbol": (4, S),
        "file_containing_extension": (5, M),
        "all_extension_numbers_of_type": (6, S),
        "list_services": (7, S),
    },
    "ExtensionRequest": {"containing_type": (1, S), "extension_number": (2, I32)},
    "ServerReflectionResponse": {
        "valid_host": (1, S),
        "original_request": (2, M),
        "file_descriptor_response": (4, M),
        "all_extension_numbers_response": (5, M),
        "list_services_response": (6, M),
        "error_response": (7, M),
    },
    "FileDescriptorResponse": {"file_descriptor_proto": (1, B)},
    "ExtensionNumberResponse": {"base_type_name": (1, S), "extension_number": (2, I32)},
    "ListServiceResponse": {"service": (1, M)},
    "ServiceResponse": {"name": (1, S)},
    "ErrorResponse": {"error_code": (1, I32), "error_message": (2, S)},
}


def _reflect(channel: grpc.Channel, service: str, requests: list, response_cls) -> list:
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    return list(call(iter(requests), timeout=TIMEOUT_S))


def _files(response) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    return files


def _pool_of(
    files: dict[str, descriptor_pb2.FileDescriptorProto],
) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding ``files`` (added dependencies first)."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    return pool


@pytest.mark.parametrize("service", [V1ALPHA, V1])
def test_reflection_lists_and_resolves(start_server, service):
    h = start_server()
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{SERVICE}.Push"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
    ]
    listed, found, by_method, missing = _reflect(
        h.channel, service, requests, reflection_pb2.ServerReflectionResponse
    )
    assert pb.DESCRIPTOR.name in _files(by_method)
    assert {s.name for s in listed.list_services_response.service} == EXPECTED_SERVICES
    pool = _pool_of(_files(found))
    push = pool.FindServiceByName(SERVICE).FindMethodByName("Push")
    assert push.input_type.full_name == "paramserve.v1.PushRequest"
    assert pb.DESCRIPTOR.name in _files(found)
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_v1_describes_itself_canonically(start_server):
    h = start_server()
    # Bootstrap: the v1 service's own file, asked for over v1.
    (found,) = _reflect(
        h.channel,
        V1,
        [reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1)],
        reflection_pb2.ServerReflectionResponse,
    )
    files = _files(found)
    v1 = files["grpc/reflection/v1/reflection.proto"]
    assert v1.package == "grpc.reflection.v1"
    assert not v1.options.deprecated
    fields = {m.name: {f.name: (f.number, f.type) for f in m.field} for m in v1.message_type}
    assert fields == CANONICAL_V1
    for message in v1.message_type:
        for field in message.field:
            assert not field.type_name or field.type_name.startswith(".grpc.reflection.v1.")
    (method,) = v1.service[0].method
    assert (method.client_streaming, method.server_streaming) == (True, True)

    # A v1 client whose messages come from that file: list, then resolve by symbol and file.
    pool = _pool_of(files)
    request_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    listed, by_symbol, by_file = _reflect(
        h.channel,
        V1,
        [
            request_cls(list_services="*"),
            request_cls(file_containing_symbol=f"{SERVICE}.Push"),
            request_cls(file_by_filename=pb.DESCRIPTOR.name),
        ],
        response_cls,
    )
    assert {s.name for s in listed.list_services_response.service} == EXPECTED_SERVICES
    assert listed.original_request.list_services == "*"
    assert pb.DESCRIPTOR.name in _files(by_symbol)
    assert pb.DESCRIPTOR.name in _files(by_file)


def test_reflection_can_describe_the_error_details(start_server):
    """google.rpc.ErrorInfo and BadRequest resolve, so generic tools can print the details."""
    h = start_server()
    requests = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
        for name in ("google.rpc.Status", "google.rpc.ErrorInfo", "google.rpc.BadRequest")
    ]
    for response in _reflect(h.channel, V1, requests, reflection_pb2.ServerReflectionResponse):
        assert response.HasField("file_descriptor_response"), response


def test_the_default_descriptor_pool_is_left_alone(start_server):
    start_server()
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindFileByName("grpc/reflection/v1/reflection.proto")
