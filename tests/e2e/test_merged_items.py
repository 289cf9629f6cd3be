"""Merged stream items: a push's header and end, and a pull reply's header, travel in the
messages of the first and last chunks (one gRPC message fewer each), where both sides read
them. Whatever the form, a push is applied exactly once, and a malformed one not at all."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from paramserve import wire
from paramserve.server import servicer as server_servicer
from paramserve.server import streams as server_streams
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.asserts import assert_same, expect_error
from tests.support.wire import TIMEOUT_S, read_stream

SGD = '{"class_name": "SGD", "config": {"learning_rate": 1.0}}'


def _values() -> list[np.ndarray]:
    return [np.arange(10, dtype=np.float32), np.full(3, 2.0, np.float32)]


def _header(values: list[np.ndarray], **fields) -> pb.PushHeader:
    names = [f"v{i}" for i in range(len(values))]
    tensors = [wire.header_for(n, v) for n, v in zip(names, values, strict=True)]
    return pb.PushHeader(worker_id="w0", tensors=tensors, **fields)


@pytest.mark.parametrize("chunk_bytes", [8, 16, 52, 1000])
def test_merged_items_are_what_protobuf_reads(chunk_bytes):
    values = _values()
    header = _header(values, sequence=3)
    raw = list(
        wire.merged_stream_items(
            header.SerializeToString(), values, chunk_bytes=chunk_bytes, end=True
        )
    )
    assert len(raw) == -(-52 // chunk_bytes)  # the chunks alone
    messages = [pb.PushRequest.FromString(r) for r in raw]
    assert all(m.WhichOneof("item") == "chunk" for m in messages)
    assert messages[0].chunk_header == header
    assert [m.HasField("chunk_header") for m in messages] == [True] + [False] * (len(raw) - 1)
    assert [m.HasField("chunk_end") for m in messages] == [False] * (len(raw) - 1) + [True]
    payload = b"".join(v.tobytes() for v in values)
    assert b"".join(m.chunk.data for m in messages) == payload
    for r, m in zip(raw, messages, strict=True):
        decoded = wire.decode_merged_item(r)
        if decoded is None:  # a middle chunk: a plain chunk item
            t, o, data = wire.decode_chunk_item(r)
        else:
            head, (t, o, data), end = decoded
            assert (head is not None, end) == (m.HasField("chunk_header"), m.HasField("chunk_end"))
            if head is not None:
                assert pb.PushHeader.FromString(bytes(head)) == header
        assert (t, o, bytes(data)) == (m.chunk.tensor, m.chunk.offset, m.chunk.data)


def test_a_stream_without_payload_is_header_and_end_items():
    values = [np.zeros(0, np.float32)]
    header = _header(values).SerializeToString()
    raw = list(wire.merged_stream_items(header, values, end=True))
    assert [pb.PushRequest.FromString(r).WhichOneof("item") for r in raw] == ["header", "end"]


def test_the_merged_decoder_leaves_anything_else_to_protobuf():
    chunk = wire.encode_chunk_item(1, 2, b"abc")
    header = wire.length_delimited(4, b"\x0a\x01w")
    end = b"\x2a\x00"
    assert wire.decode_merged_item(header + chunk + end) is not None
    assert wire.decode_merged_item(end + chunk) is not None  # any order
    assert wire.decode_merged_item(chunk) is None  # nothing merged: a plain chunk
    assert wire.decode_merged_item(header + end) is None  # no chunk
    assert wire.decode_merged_item(header + header + chunk) is None  # a field twice
    assert wire.decode_merged_item(chunk + chunk + end) is None
    assert wire.decode_merged_item(chunk + b"\x2a\x02\x08\x01") is None  # a StreamEnd with data
    assert wire.decode_merged_item(chunk + end + b"\x30\x01") is None  # an unknown field
    assert wire.decode_merged_item((header + chunk + end)[:-1]) is None  # truncated


@pytest.fixture
def server(start_server):
    server = start_server(mode="async")
    server.create(
        {"v0": np.zeros(10, np.float32), "v1": np.zeros(3, np.float32)}, optimizer_json=SGD
    )
    return server


def _raw_push(server, items) -> pb.PushResponse:
    return server.stub.Push(iter(items), timeout=TIMEOUT_S)


def test_the_client_merges_once_the_server_says_it_reads_merged_items(server, connect):
    client = connect(server, chunk_bytes=16)
    sent: list[list[bytes]] = []
    push = client._push

    def spy(requests, **kwargs):
        items = list(requests)
        sent.append(items)
        return push(iter(items), **kwargs)

    client._push = spy
    grads = {"v0": np.ones(10, np.float32), "v1": np.ones(3, np.float32)}
    for _ in range(3):
        assert client.push(grads).applied
    # 52 bytes in 16-byte chunks: 4 chunk messages, and the header and end items at first.
    assert [len(items) for items in sent] == [6, 4, 4]
    assert pb.PushRequest.FromString(sent[1][0]).HasField("chunk_header")
    assert pb.PushRequest.FromString(sent[1][-1]).HasField("chunk_end")
    version, weights = server.pull()
    assert version == 3
    assert_same(weights, {"v0": np.full(10, -3.0, np.float32), "v1": np.full(3, -3.0, np.float32)})


def test_merged_items_written_by_protobuf_are_taken(server):
    values = [np.ones(10, np.float32), np.ones(3, np.float32)]
    payload = b"".join(v.tobytes() for v in values)
    header = _header(values, sequence=1)
    one = pb.PushRequest(
        chunk=tpb.TensorChunk(data=payload), chunk_header=header, chunk_end=tpb.StreamEnd()
    )
    response = _raw_push(server, [one])
    assert response.applied and response.reads_merged_items
    header.sequence = 2
    split = [
        pb.PushRequest(chunk=tpb.TensorChunk(data=payload[:20]), chunk_header=header),
        pb.PushRequest(chunk=tpb.TensorChunk(tensor=0, offset=20, data=payload[20:])),
    ]
    assert _raw_push(server, [*split, pb.PushRequest(end=tpb.StreamEnd())]).applied
    header.sequence = 3  # a resend of sequence 2 would be a duplicate: a new one
    split[0].chunk_header.sequence = 3
    split[1].chunk_end.SetInParent()
    assert _raw_push(server, split).applied
    version, weights = server.pull()
    assert version == 3
    assert_same(weights, {"v0": np.full(10, -3.0, np.float32), "v1": np.full(3, -3.0, np.float32)})


def test_malformed_merged_items_are_refused_and_change_nothing(server):
    values = [np.ones(10, np.float32), np.ones(3, np.float32)]
    payload = b"".join(v.tobytes() for v in values)
    header = _header(values, sequence=1)
    before = server.state()
    chunk = tpb.TensorChunk(data=payload)
    bad = [
        # A merged header beside something other than a chunk.
        ([pb.PushRequest(end=tpb.StreamEnd(), chunk_header=header)], "beside a chunk"),
        ([pb.PushRequest(header=header, chunk_end=tpb.StreamEnd())], "beside a chunk"),
        # A header merged into a later chunk: a second header.
        (
            [
                pb.PushRequest(header=header),
                pb.PushRequest(chunk=tpb.TensorChunk(data=payload[:20]), chunk_header=header),
            ],
            "only chunks and the end item",
        ),
        # Something after a merged end.
        (
            [
                pb.PushRequest(chunk=chunk, chunk_header=header, chunk_end=tpb.StreamEnd()),
                pb.PushRequest(end=tpb.StreamEnd()),
            ],
            "nothing may follow the end item",
        ),
        # The end merged into a chunk that leaves the stream short.
        (
            [
                pb.PushRequest(
                    chunk=tpb.TensorChunk(data=payload[:20]),
                    chunk_header=header,
                    chunk_end=tpb.StreamEnd(),
                )
            ],
            "ended early",
        ),
        # No end at all.
        ([pb.PushRequest(chunk=chunk, chunk_header=header)], "without its end item"),
    ]
    for items, message in bad:
        expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, lambda i=items: _raw_push(server, i), match=message
        )
    server.assert_unchanged(before)


def test_a_pull_merges_its_header_only_when_asked(server, connect):
    expected = {"v0": np.zeros(10, np.float32), "v1": np.zeros(3, np.float32)}
    for merged in (False, True):
        request = pb.PullRequest(packed_chunks=True, merged_items=merged)
        items = list(server.stub.Pull(request, timeout=TIMEOUT_S))
        if merged:
            assert len(items) == 1 and items[0].WhichOneof("item") == "chunk"
            assert items[0].HasField("chunk_header")
            items = [tpb.TensorStreamItem(header=items[0].chunk_header), items[0]]
        else:
            assert [i.WhichOneof("item") for i in items] == ["header", "chunk"]
        version, weights = read_stream(items)
        assert version == 0
        assert_same(weights, expected)
    # The SDK reads either form, into new arrays or into out=.
    client = connect(server, timeout_s=TIMEOUT_S)
    assert_same(dict(client.pull()), expected)
    out = {n: np.full_like(v, 7.0) for n, v in expected.items()}
    assert_same(dict(client.pull(out=out)), expected)
    assert_same(out, expected)


def test_a_merged_pull_of_nothing_is_its_header(start_server, connect):
    server = start_server(mode="async")
    server.create({"empty": np.zeros((0, 4), np.float32)}, optimizer_json=SGD)
    items = list(
        server.stub.Pull(pb.PullRequest(packed_chunks=True, merged_items=True), timeout=TIMEOUT_S)
    )
    assert [i.WhichOneof("item") for i in items] == ["header"]
    client = connect(server, timeout_s=TIMEOUT_S)
    assert client.pull()["empty"].shape == (0, 4)


def test_the_client_falls_back_for_a_server_that_does_not_read_merged_items(
    start_server, connect, monkeypatch
):
    """A server older than merged items reads the first message as a chunk, refuses the push
    and applies nothing: the SDK sends it again as separate items, once."""

    def older(message_cls):
        def deserialize(raw: bytes):
            chunk = wire.decode_chunk_item(raw)
            return chunk if chunk is not None else message_cls.FromString(raw)

        return deserialize

    monkeypatch.setattr(server_streams, "chunk_or", older)
    real = server_servicer.messages.push_response
    monkeypatch.setattr(
        server_servicer.messages,
        "push_response",
        lambda result, reads_merged_items=False: real(result),
    )
    server = start_server(mode="async")
    server.create({"v0": np.zeros(10, np.float32)}, optimizer_json=SGD)
    client = connect(server, chunk_bytes=16)
    client._merged_pushes = True  # as if a newer server had answered at this address before
    grads = {"v0": np.ones(10, np.float32)}
    assert client.push(grads).applied
    assert not client._merged_pushes
    assert client.push(grads).applied
    version, weights = server.pull()
    assert version == 2
    assert_same(weights, {"v0": np.full(10, -2.0, np.float32)})
    refused = server.metrics.rpcs.labels(method="Push", code="INVALID_ARGUMENT")._value.get()
    assert refused == 1
