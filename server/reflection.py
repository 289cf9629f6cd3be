"""Server reflection, v1 and v1alpha, answered by one servicer from a private descriptor pool.

grpcio-reflection 1.85 implements only ``grpc.reflection.v1alpha.ServerReflection``. Its v1
successor, ``grpc.reflection.v1.ServerReflection`` (what current grpcurl, Postman and
grpc-java/go clients try first), has the same messages, field for field (names, numbers,
types), under another package, so the v1alpha servicer answers v1 calls unchanged. A v1
client must also be able to resolve the v1 service itself: its file is derived from the
v1alpha one (package and type references renamed, v1's options instead of the deprecation)
and served from a pool of its own, next to the listed services' files and their
dependencies, so the process-wide default pool is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"
_V1_PACKAGE = "grpc.reflection.v1"


def v1_file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``, derived from grpcio-reflection's v1alpha file."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{_V1_PACKAGE}."
    proto.name, proto.package = V1_FILE_NAME, _V1_PACKAGE
    proto.options.Clear()  # v1alpha's say deprecated and name its Java/Go packages
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"

    def renamed(type_name: str) -> str:
        return new + type_name[len(old) :] if type_name.startswith(old) else type_name

    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.type_name.startswith(old):  # assigning sets it, even to ""
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    return proto


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A private pool: the services' files, both reflection files, google.rpc, and imports."""
    default = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    names = [n for n in service_names if n not in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)]
    for name in names:
        add(default.FindServiceByName(name).file)
    for file in (reflection_pb2.DESCRIPTOR, status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR):
        add(file)
    pool.AddSerializedFile(v1_file_descriptor_proto().SerializeToString())
    return pool


class _MethodResolvingPool:
    """A pool that also finds ``package.Service.Method`` (upb's pool does not resolve methods)."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:  # noqa: N802
        """The file declaring ``symbol``; KeyError when there is none."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server`` for ``service_names`` (and themselves)."""
    names = list(dict.fromkeys([*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]))
    pool = _MethodResolvingPool(reflection_pool(names))
    servicer = reflection.ReflectionServicer(names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # v1's messages are v1alpha's on the wire: the same (de)serializers serve both.
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),)
    )
    server.add_registered_method_handlers(V1_SERVICE_NAME, handlers)
