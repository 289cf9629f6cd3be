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
from dataclasses import dataclass
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
_WIDENED = np.dtype("float32")  # what a tensor widened on arrival becomes
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
    """Request deserializer: chunk items as views of the received bytes (one copy fewer).

    A wrapper with merged items (``chunk_header`` and ``chunk_end`` beside its chunk, see
    ``PushRequest``) becomes the list of the items it stands for, the header first and the
    end last, which :func:`decoded` hands on one by one: handlers see the stream as if each
    had come in a message of its own.
    """
    fields = message_cls.DESCRIPTOR.fields_by_name
    merged = "chunk_header" in fields and "chunk_end" in fields  # (PushRequest)
    end_item = message_cls(end=tpb.StreamEnd()) if merged else None

    def deserialize(raw: bytes) -> ChunkView | Any:
        chunk = wire.decode_chunk_item(raw)
        if chunk is not None:
            return chunk
        if merged:
            parts = wire.decode_merged_item(raw)
            if parts is not None:
                header, chunk, end = parts
                items: list[Any] = []
                if header is not None:
                    items.append(message_cls.FromString(wire.length_delimited(1, bytes(header))))
                items.append(chunk)
                if end:
                    items.append(end_item)
                return items
        message = message_cls.FromString(raw)
        if merged and (message.HasField("chunk_header") or message.HasField("chunk_end")):
            return _merged_items(message_cls, message, end_item)
        return message

    return deserialize


def _merged_items(message_cls: Any, message: Any, end_item: Any) -> list[Any] | _Undecodable:
    """The items a wrapper parsed by protobuf with merged fields stands for (see chunk_or)."""
    if message.WhichOneof("item") != "chunk":
        return _Undecodable(
            message_cls, ValueError("chunk_header and chunk_end travel only beside a chunk")
        )
    items: list[Any] = []
    if message.HasField("chunk_header"):
        items.append(message_cls(header=message.chunk_header))
    chunk = message.chunk
    items.append((chunk.tensor, chunk.offset, memoryview(chunk.data)))
    if message.HasField("chunk_end"):
        items.append(end_item)
    return items


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
        if type(item) is list:  # merged items of one message (see chunk_or)
            yield from item
        elif isinstance(item, _Undecodable):
            raise InvalidArgument(item.message)
        else:
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


@dataclass(frozen=True)
class ScanSegment:
    """A stretch of dense float tensors of one dtype lying end to end in both the stream and
    the receive buffer: scanned for NaN and Inf as one array."""

    stream_start: int
    stream_end: int
    buffer_start: int
    dtype: np.dtype
    names: frozenset[str]
    order: tuple[str, ...]  # the names in stream order
    # Widened to float32 (``dtype``) on arrival, from bfloat16 or float16: twice the
    # stream's bytes in the receive buffer, and never scanned (the widening tells).
    widened: bool = False

    def flat(self, buffer: np.ndarray) -> np.ndarray:
        """The segment's tensors as one flat array (a view of the receive buffer)."""
        length = self.stream_end - self.stream_start
        end = self.buffer_start + (2 * length if self.widened else length)
        return buffer[self.buffer_start : end].view(self.dtype)


def scan_segments(layout: wire.StreamLayout) -> list[ScanSegment]:
    """The :class:`ScanSegment` s of a stream layout (one for a model whose variables share a
    dtype), computed once per header list with its layout. Tensors the layout widens on
    arrival make segments of their float32 values."""
    out: list[ScanSegment] = []
    # [stream_start, stream_end, buffer_start, dtype, names, widened]
    current: list[Any] | None = None

    def close(current: list[Any]) -> None:
        names = current[4]
        out.append(ScanSegment(*current[:4], frozenset(names), tuple(names), current[5]))

    for h, s, b, length, wide in zip(
        layout.headers,
        layout.stream_starts,
        layout.buffer_starts,
        layout.lengths,
        layout.widened,
        strict=True,
    ):
        if h.layout != tpb.LAYOUT_DENSE or h.dtype not in _FLOAT_CODES:
            continue
        dtype = _WIDENED if wide else wire.dtype_from_proto(h.dtype)
        if (
            current is not None
            and current[3] == dtype
            and current[5] == wide
            and current[1] == s
            and current[2] + (s - current[0]) * (2 if wide else 1) == b
        ):
            current[1] = s + length
            current[4].append(h.name)
            continue
        if current is not None:
            close(current)
        current = [s, s + length, b, dtype, [h.name], wide]
    if current is not None:
        close(current)
    return out


class FiniteScan:
    """Tracks which dense float tensors of a stream are all-finite, piece by piece.

    Scanning each chunk while it arrives overlaps the check with the transfer, while the
    chunk is still in cache; the store's check then skips those tensors
    (:class:`~paramserve.server.gradients.FiniteChecked`) instead of reading them again.
    Tensors of one dtype that lie end to end are scanned together (:class:`ScanSegment`),
    so a model of many small variables costs one scan per chunk, not one per variable.
    """

    def __init__(self, segments: Sequence[ScanSegment]) -> None:
        # Widened segments are not scanned: the assembler tells whether they are finite.
        self._segments = [seg for seg in segments if not seg.widened]
        self._next = 0  # the first segment not scanned completely
        self._checked = 0  # stream bytes of that segment scanned so far (from its start)
        self._bad: set[int] = set()

    def copier(self, buffer: np.ndarray) -> Callable[[memoryview, int, memoryview, int], None]:
        """The ``copy`` of a :class:`~paramserve.wire.TensorAssembler` receiving into
        ``buffer``: a piece that continues the segment being scanned with whole float32 or
        float64 elements is copied and checked in one pass (``wire.copy_checked``), so
        :meth:`update` has nothing left to read there; any other piece is copied as is."""

        def copy(target: memoryview, at: int, piece: memoryview, position: int) -> None:
            segments, k = self._segments, self._next
            if k < len(segments):
                seg = segments[k]
                n = len(piece)
                size = seg.dtype.itemsize
                checked = self._checked
                if (
                    position == seg.stream_start + checked
                    and position + n <= seg.stream_end
                    and not (checked % size or n % size)
                    and target.obj is buffer
                ):
                    finite = wire.copy_checked(piece, buffer[at : at + n].view(seg.dtype))
                    if finite is not None:
                        if not finite:
                            self._bad.add(k)
                        self._checked = checked + n
                        if position + n == seg.stream_end:
                            self._next, self._checked = k + 1, 0
                        return
            target[at : at + len(piece)] = piece

        return copy

    def update(self, buffer: np.ndarray, received: int) -> None:
        """Scan the whole elements of ``buffer`` (the receive buffer) that arrived before
        stream position ``received`` and were not scanned yet."""
        segments = self._segments
        while self._next < len(segments):
            seg = segments[self._next]
            start = seg.stream_start + self._checked
            end = min(received, seg.stream_end)
            end -= (end - seg.stream_start) % seg.dtype.itemsize
            if end > start:
                if self._next not in self._bad:
                    at = seg.buffer_start + start - seg.stream_start
                    if not all_finite(buffer[at : at + end - start].view(seg.dtype)):
                        self._bad.add(self._next)
                self._checked = end - seg.stream_start
            if end < seg.stream_end:
                return
            self._next += 1
            self._checked = 0

    def finite(self) -> frozenset[str]:
        """Names of the tensors scanned completely and found all-finite."""
        segments = self._segments[: self._next]
        done = [seg.names for i, seg in enumerate(segments) if i not in self._bad]
        if len(done) == 1:
            return done[0]
        return frozenset().union(*done)


def receive_tensors(
    headers: list[tpb.TensorHeader],
    requests: Iterator[Any],
    context: grpc.ServicerContext,
    *,
    method: str,
    count_bytes: Callable[[int], None],
    scan_finite: bool = False,
    layout: wire.StreamLayout | None = None,
    segments: Sequence[ScanSegment] | None = None,
    packed: bool = False,
    widen: Sequence[bool] | None = None,
) -> dict[str, wire.TensorValue]:
    """The tensors whose chunks follow validated ``headers``, in strict order, then the end.

    ``count_bytes`` is told the payload bytes received once the stream ends, complete or
    not. ``scan_finite``: check dense gradients for NaN/Inf chunk by chunk as they arrive,
    and return them as ``FiniteChecked`` so the store's check does not read them again.
    ``layout`` and ``segments``: the headers' stream layout and scan segments, when the
    caller keeps them from an earlier stream with the same headers. The tensors are views
    of one receive buffer (each aligned to its item size). ``packed``: return them as
    ``FiniteChecked`` with each segment's tensors also as one flat array (``packed``), so the
    store can check and apply a slab of the same variables whole.
    ``widen[i]`` (or the ``layout``'s own ``widen``): tensor ``i`` (dense bfloat16 or
    float16) arrives widened to float32, each chunk widened straight from the received
    bytes into the receive buffer (the scan comes with the widening).
    """
    if layout is None:
        layout = wire.StreamLayout(headers, widen=widen if widen and any(widen) else None)
        widen = None  # (the layout's own)
    if segments is None and (scan_finite or packed):
        segments = scan_segments(layout)
    scan = FiniteScan(segments) if scan_finite and segments is not None else None
    buffer = wire.aligned_buffer(layout.buffer_bytes)
    assembler = wire.TensorAssembler(
        headers,
        layout=layout,
        widen=widen,
        buffer=buffer,
        copy=scan.copier(buffer) if scan is not None else None,
    )
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
        assembler.add(tensor, offset, data)  # the one copy, into the receive buffer
        if scan is not None:
            scan.update(buffer, assembler.received)
    count_bytes(assembler.received)
    tensors = assembler.finish()
    require_end(ended, method, context)
    finite = frozenset()
    if scan is not None:
        finite = scan.finite()
        widened = assembler.widened_finite()
        if widened:
            finite = finite | widened if finite else widened
    if packed and segments:
        flats = [(seg.order, seg.flat(buffer)) for seg in segments if len(seg.order) > 1]
        return FiniteChecked(tensors, finite=finite, packed=flats)
    return FiniteChecked(tensors, finite=finite) if scan is not None else tensors


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
