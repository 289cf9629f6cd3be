"""Requests and replies built and read with the raw generated stubs, never the SDK, so a test
controls every message (chunk sizes, headers, sequences)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from paramserve import wire
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from .models.tiny import SGD_JSON

TIMEOUT_S = 20.0


def chunk_messages(
    values: Sequence[wire.TensorValue], *, chunk_bytes: int = wire.CHUNK_BYTES
) -> Iterator[tpb.TensorChunk]:
    """Protobuf ``TensorChunk`` messages for ``values``, cut by ``paramserve.wire.iter_chunks``
    (the daemon and the SDK send hand-encoded chunks instead)."""
    for i, offset, piece in wire.iter_chunks(values, chunk_bytes=chunk_bytes):
        yield tpb.TensorChunk(tensor=i, offset=offset, data=bytes(piece))


def create_model_requests(
    variables: dict[str, np.ndarray],
    *,
    optimizer_json: str = SGD_JSON,
    name: str = "m",
    chunk_bytes: int = wire.CHUNK_BYTES,
) -> Iterator[pb.CreateModelRequest]:
    headers = [wire.header_for(n, v) for n, v in variables.items()]
    yield pb.CreateModelRequest(
        header=pb.CreateModelHeader(
            model_name=name, optimizer_json=optimizer_json, variables=headers
        )
    )
    for chunk in chunk_messages(list(variables.values()), chunk_bytes=chunk_bytes):
        yield pb.CreateModelRequest(chunk=chunk)
    yield pb.CreateModelRequest(end=tpb.StreamEnd())


def push_requests(
    grads: dict[str, wire.TensorValue],
    *,
    worker_id: str = "w0",
    sequence: int = 1,
    base_version: int = 0,
    headers: list[tpb.TensorHeader] | None = None,
) -> list[pb.PushRequest]:
    if headers is None:
        headers = [wire.header_for(n, v) for n, v in grads.items()]
    items = [
        pb.PushRequest(
            header=pb.PushHeader(
                worker_id=worker_id, sequence=sequence, base_version=base_version, tensors=headers
            )
        )
    ]
    items += [pb.PushRequest(chunk=c) for c in chunk_messages(list(grads.values()))]
    return [*items, pb.PushRequest(end=tpb.StreamEnd())]


def read_stream(items) -> tuple[int, dict[str, wire.TensorValue]]:
    """Decode a TensorStreamItem stream (header then chunks) into (version, tensors)."""
    it = iter(items)
    first = next(it)
    assert first.WhichOneof("item") == "header"
    headers = list(first.header.tensors)
    assembler = wire.TensorAssembler(headers)
    for item in it:
        assembler.add(item.chunk.tensor, item.chunk.offset, item.chunk.data)
    return first.header.version, assembler.finish()


def pull(stub, **kwargs) -> tuple[int, dict[str, wire.TensorValue]]:
    return read_stream(stub.Pull(pb.PullRequest(**kwargs), timeout=TIMEOUT_S))
