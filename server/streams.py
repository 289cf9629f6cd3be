"""The gRPC layer's streams: request messages decoded tolerantly, client streams received
strictly, files and tensors sent in chunks.

Client streams (CreateModel, Push, SetOptimizerState, UploadSnapshot) are a header, the
payload chunks, then an explicit end item; a request acts only on a stream that ended with
it while the call is still active. Tensor chunks are decoded straight from the received
bytes (``paramserve.wire.decode_chunk_item``) and copied once, into their tensor's buffer,
where dense gradients are checked for NaN and Inf as they arrive (:class:`FiniteScan`).
A request protobuf cannot parse becomes INVALID_ARGUMENT, not gRPC's INTERNAL.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from paramserve import wire
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from .errors import Cancelled, InvalidArgument
from .gradients import FiniteChecked, all_finite

# A client-stream item after deserialization: a chunk decoded straight from the received
# bytes as ``(tensor, offset, data view)``, or the parsed protobuf message (headers).
ChunkView = tuple[int, int, memoryview]
_FLOAT_CODES = frozenset((tpb.FLOAT32, tpb.FLOAT64, tpb.FLOAT16, tpb.BFLOAT16))


# --- decoding requests -----------------------------------------------------------------------
class _Undecodable:
    """A request message that protobuf could not parse: answered INVALID_ARGUMENT.

    gRPC answers a deserializer exception with INTERNAL, so the deserializers return this
    instead and :func:`decoded` raises in the handler.
    """

    def __init__(self, message_cls: Any, error: Exception) -> None:
        self.message = f"malformed {message_cls.DESCRIPTOR.name} message: {error}"


def tolerant(deserialize: Callable[[bytes], Any], message_cls: Any) -> Callable[[bytes], Any]:
    """``deserialize`` returning an :class:`_Undecodable` instead of raising DecodeError."""

    def tolerant_deserialize(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return _Undecodable(message_cls, exc)

    return tolerant_deserialize


def chunk_or(message_cls: Any) -> Callable[[bytes], ChunkView | Any]:
    """Request deserializer: chunk items as views of the received bytes (one copy fewer)."""

    def deserialize(raw: bytes) -> ChunkView | Any:
        chunk = wire.decode_chunk_item(raw)
        return chunk if chunk is not None else message_cls.FromString(raw)

    return deserialize


def message_or_bytes(item: Any) -> bytes:
    """Response serializer: pre-encoded chunk items pass through, messages are serialized."""
    return item if isinstance(item, bytes) else item.SerializeToString()


def decoded(request: Any) -> Any:
    """The request, or its stream with each item checked; InvalidArgument if one was malformed."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.message)
    if isinstance(request, Iterator):
        return _decoded_items(request)
    return request


def _decoded_items(items: Iterator[Any]) -> Iterator[Any]:
    for item in items:
        if isinstance(item, _Undecodable):
            raise InvalidArgument(item.message)
        yield item


# --- receiving client streams ----------------------------------------------------------------
def first_item(requests: Iterator[Any], expected: str, what: str) -> Any:
    """The first message of a client stream, which must carry ``expected`` (the header)."""
    first = next(requests, None)
    if first is None:
        raise InvalidArgument(f"empty stream: the first message must be a {what}")
    kind = "chunk" if isinstance(first, tuple) else first.WhichOneof("item")
    if kind != expected:
        raise InvalidArgument(f"the first message of the stream must be a {what}, got {kind}")
    return getattr(first, expected)


def require_end(ended: bool, method: str, context: grpc.ServicerContext) -> None:
    """Refuse a client stream that did not end with its end item, or whose call has ended.

    gRPC Python ends the request iterator normally when the transport refuses a message
    (one over ``max_message_bytes``) or the client goes away; the end item and the call
    still being active together prove the client sent everything, so only then does a
    request change state.
    """
    if not ended:
        raise InvalidArgument(
            f"{method}: the stream ended without its end item (StreamEnd), so the request "
            "may be incomplete; nothing was changed. Send the header, the chunks, then `end`"
        )
    if not context.is_active():
        raise Cancelled(f"{method}: the call ended before the request was acted on")


class FiniteScan:
    """Tracks which dense float tensors of a stream are all-finite, piece by piece.

    Scanning each chunk while it arrives overlaps the check with the transfer, while the
    chunk is still in cache; the store's check then skips those tensors
    (:class:`~paramserve.server.gradients.FiniteChecked`) instead of reading them again.
    """

    def __init__(self, headers: Sequence[tpb.TensorHeader]) -> None:
        self._headers = list(headers)
        self._dtypes = {
            i: wire.dtype_from_proto(h.dtype)
            for i, h in enumerate(self._headers)
            if h.layout == tpb.LAYOUT_DENSE and h.dtype in _FLOAT_CODES
        }
        self._checked = [0] * len(self._headers)
        self._bad: set[int] = set()

    def update(self, tensor: int, buffer: np.ndarray, received: int) -> None:
        """Scan tensor ``tensor``'s whole elements in ``buffer[:received]`` not scanned yet."""
        dtype = self._dtypes.get(tensor)
        if dtype is None or tensor in self._bad:
            return
        start, end = self._checked[tensor], received - received % dtype.itemsize
        if end > start:
            if not all_finite(buffer[start:end].view(dtype)):
                self._bad.add(tensor)
            self._checked[tensor] = end

    def finite(self) -> frozenset[str]:
        """Names of the tensors scanned completely and found all-finite."""
        return frozenset(
            h.name
            for i, h in enumerate(self._headers)
            if i in self._dtypes and i not in self._bad and self._checked[i] == h.byte_length
        )


def receive_tensors(
    headers: list[tpb.TensorHeader],
    requests: Iterator[Any],
    context: grpc.ServicerContext,
    *,
    method: str,
    count_bytes: Callable[[int], None],
    scan_finite: bool = False,
    widen: Sequence[bool] | None = None,
) -> dict[str, wire.TensorValue]:
    """The tensors whose chunks follow validated ``headers``, in strict order, then the end.

    ``count_bytes`` is told the payload bytes received once the stream ends, complete or
    not. ``scan_finite``: check dense gradients for NaN/Inf chunk by chunk as they arrive,
    and return them as ``FiniteChecked`` so the store's check does not read them again.
    ``widen[i]``: tensor ``i`` (dense bfloat16 or float16) arrives widened to float32, each
    chunk widened straight from the received bytes (the scan comes with the widening).
    """
    assembler = wire.TensorAssembler(headers, widen=widen)
    scan = FiniteScan(headers) if scan_finite else None
    received = 0
    ended = False
    for item in requests:
        if ended:
            raise InvalidArgument(f"{method}: nothing may follow the end item")
        if isinstance(item, tuple):
            tensor, offset, data = item
        elif item.WhichOneof("item") == "chunk":
            tensor, offset, data = item.chunk.tensor, item.chunk.offset, item.chunk.data
        elif item.WhichOneof("item") == "end":
            ended = True
            continue
        else:
            raise InvalidArgument(f"{method}: only chunks and the end item may follow the header")
        assembler.add(tensor, offset, data)  # the one copy, into the tensor's buffer
        if scan is not None and not assembler.widens(tensor):
            scan.update(tensor, assembler.buffer(tensor), offset + len(data))
        received += len(data)
    count_bytes(received)
    tensors = assembler.finish()
    require_end(ended, method, context)
    if scan is None:
        return tensors
    return FiniteChecked(tensors, finite=scan.finite() | assembler.widened_finite())


class UploadChunks:
    """The file chunks of an UploadSnapshot stream after its header, checked as they come.

    Iterate it once; ``received`` counts the bytes taken so far.
    """

    def __init__(
        self, requests: Iterator[Any], size_bytes: int, context: grpc.ServicerContext
    ) -> None:
        self._requests = requests
        self._size = size_bytes
        self._context = context
        self.received = 0

    def __iter__(self) -> Iterator[bytes]:
        size, ended = self._size, False
        for item in self._requests:
            if ended:
                raise InvalidArgument("UploadSnapshot: nothing may follow the end item")
            if item.WhichOneof("item") == "end":
                ended = True
                continue
            if item.WhichOneof("item") != "chunk":
                raise InvalidArgument(
                    "UploadSnapshot: only chunks and the end item may follow the header"
                )
            if item.chunk.offset != self.received:
                raise InvalidArgument(
                    f"snapshot chunk at offset {item.chunk.offset}, expected {self.received}"
                )
            data = item.chunk.data
            self.received += len(data)
            if self.received > size:
                raise InvalidArgument(f"more than the declared {size} bytes were sent")
            yield data
        if self.received != size:
            raise InvalidArgument(f"upload ended early: {self.received} of {size} bytes")
        require_end(ended, "UploadSnapshot", self._context)


# --- sending ---------------------------------------------------------------------------------
def drain(items: collections.deque[bytes]) -> Iterator[bytes]:
    """Yield and forget ``items`` one by one, so each can be freed once it is sent."""
    while items:
        yield items.popleft()


def file_chunks(path: Path, chunk_bytes: int) -> Iterator[pb.FileChunk]:
    """The file at ``path`` as FileChunks of ``chunk_bytes`` (one even when it is empty)."""
    sent = 0
    with path.open("rb") as fh:
        total = os.fstat(fh.fileno()).st_size
        while True:
            data = fh.read(chunk_bytes)
            if not data and sent > 0:
                break
            yield pb.FileChunk(offset=sent, data=data, total_size=total)
            sent += len(data)
            if not data:  # an empty file still gets one chunk carrying total_size
                break
