"""Striped pulls: a large pull cut into contiguous ranges of whole chunks, each on its own
concurrent stream (of one channel, or of channels of their own), put back together in place.
Real servers on loopback; every result is compared bit for bit with one stream's."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from paramserve.client import Client, DataLossError, NotFoundError
from paramserve.client import client as client_module
from paramserve.client import streams as client_streams
from paramserve.server import servicer as server_servicer
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.asserts import assert_same, expect_error
from tests.support.wire import TIMEOUT_S

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
# The server cuts its replies every 48 KiB (64 KiB messages less framing headroom), so a
# model of a few hundred KiB is many chunks; the client stripes a pull over up to K streams,
# at least one of its 16 KiB chunks each.
SERVER = {"mode": "async", "max_message_bytes": 64 << 10}
CLIENT = {"chunk_bytes": 16 << 10, "timeout_s": TIMEOUT_S}


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((300, 170)).astype(np.float32),  # 204,000 bytes
        "bias": rng.standard_normal(7).astype(np.float32),
        "scalar": np.float32(rng.standard_normal()).reshape(()),
        "dense": rng.standard_normal((129, 101)).astype(np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "tail": rng.standard_normal(40_001).astype(np.float32),
    }


def _grads(model: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {n: (rng.standard_normal(v.shape) * 0.1).astype(v.dtype) for n, v in model.items()}


@pytest.fixture
def server(start_server):
    return start_server(**SERVER)


@pytest.fixture
def stripes_seen(monkeypatch) -> list[int]:
    """How many stripes each striped pull of the SDK had."""
    seen: list[int] = []
    receive = client_streams.receive_stripes

    def spy(replies, **kwargs):
        seen.append(len(replies))
        return receive(replies, **kwargs)

    monkeypatch.setattr(client_module, "receive_stripes", spy)
    return seen


@pytest.mark.parametrize("own_channels", [False, True])
@pytest.mark.parametrize("wire_dtype", [None, "bfloat16"])
def test_striped_pulls_equal_one_stream(
    server, connect, stripes_seen, monkeypatch, own_channels, wire_dtype
):
    monkeypatch.setattr(client_module, "STRIPE_CHANNELS", own_channels)
    model = _model()
    client = connect(server, wire_dtype=wire_dtype, **CLIENT)
    assert client._own_stripe_channels is own_channels
    client.create_model(model, ADAM)
    for step in range(2):
        client.push(_grads(model, step))
        whole = {n: v.copy() for n, v in client.pull(streams=1).items()}
        version = client.base_version
        assert version == step + 1
        for k in (2, 3, 5, 8):
            got = client.pull(streams=k)
            assert got.version == version
            assert_same(dict(got), whole)
            out = {n: np.full_like(v, 7) for n, v in model.items()}
            into = client.pull(streams=k, out=out)
            assert all(into[n] is out[n] for n in model)
            assert_same(out, whole)
            # A selection is striped on its own (once its size is known).
            names = ["tail", "bias", "embed"]
            client.pull(names, streams=1)
            assert_same(dict(client.pull(names, streams=k)), {n: whole[n] for n in names})
    assert stripes_seen and set(stripes_seen) <= {2, 3, 5, 8}
    if wire_dtype is not None:  # bfloat16 weights, widened to float32 in place
        assert client.pull(streams=3)["embed"].dtype == np.float32


def test_the_client_setting_and_its_environment_variable(server, connect, monkeypatch):
    model = _model()
    monkeypatch.setenv("PARAMSERVE_PULL_STREAMS", "4")
    client = connect(server, **CLIENT)
    assert client.pull_streams == 4
    client.create_model(model, ADAM)
    first = client.pull()  # not striped: its size is not known yet
    seen: list[int] = []
    receive = client_streams.receive_stripes
    monkeypatch.setattr(
        client_module,
        "receive_stripes",
        lambda replies, **kw: (seen.append(len(replies)), receive(replies, **kw))[1],
    )
    assert_same(dict(client.pull()), dict(first))
    assert seen == [4]
    assert client.pull(streams=1) and seen == [4]
    monkeypatch.delenv("PARAMSERVE_PULL_STREAMS")
    assert connect(server, **CLIENT).pull_streams == "auto"
    assert connect(server, pull_streams=" AUTO ", **CLIENT).pull_streams == "auto"
    assert client_module.auto_pull_streams(1 << 30, 2) == 1
    for bad in (0, 65, "two", True, 2.0):
        with pytest.raises(ValueError, match="pull_streams"):
            Client(server.address, pull_streams=bad)
        with pytest.raises(ValueError, match="pull_streams"):
            client.pull(streams=bad)


def test_small_pulls_are_not_striped(server, connect, stripes_seen):
    client = connect(server, **CLIENT)
    client.create_model({"w": np.ones(1000, np.float32)}, ADAM)
    for _ in range(3):
        np.testing.assert_array_equal(client.pull(streams=4)["w"], np.ones(1000, np.float32))
    assert stripes_seen == []
    # Up to K streams, a client chunk or more each: 40,000 bytes are two of 16 KiB (and one
    # of the server's 48 KiB chunks: a stripe may be empty, a header alone).
    client.delete_model()
    values = np.arange(10_000, dtype=np.float32)
    client.create_model({"v": values}, ADAM)
    for _ in range(2):
        np.testing.assert_array_equal(client.pull(streams=4)["v"], values)
    assert stripes_seen == [2]


def test_stripes_of_different_versions_are_pulled_again_whole(
    server, connect, stripes_seen, monkeypatch
):
    """A push landing between the stripes' reads: the stripes disagree on the version, so
    the pull is made again as one stream (here the servicer is made to tell each stripe
    another version)."""
    model = _model()
    client = connect(server, **CLIENT)
    client.create_model(model, ADAM)
    client.push(_grads(model, 0))
    whole = client.pull(streams=1)
    expected = {n: v.copy() for n, v in whole.items()}
    core = server.core
    real = core.model_version
    lies = iter([7, 8, 9])  # one per stripe; then the truth for the whole pull
    monkeypatch.setattr(core, "model_version", lambda: next(lies, None) or real())
    out = {n: np.empty_like(v) for n, v in model.items()}
    got = client.pull(streams=3, out=out)
    assert stripes_seen == [3]
    assert got.version == 1
    assert_same(out, expected)


def test_a_server_that_does_not_stripe(start_server, connect, stripes_seen, monkeypatch):
    """A server older than stripes ignores them and sends whole streams: the SDK reads one,
    and stripes no more pulls of that client."""
    monkeypatch.setattr(
        server_servicer.ParameterServerServicer, "_stripe_of", staticmethod(lambda request: None)
    )
    server = start_server(**SERVER)
    model = _model()
    client = connect(server, **CLIENT)
    client.create_model(model, ADAM)
    expected = {n: v.copy() for n, v in client.pull(streams=1).items()}
    assert_same(dict(client.pull(streams=4)), expected)
    assert_same(dict(client.pull(streams=4)), expected)
    assert stripes_seen == [4]  # tried once


def test_failures_of_a_striped_pull_are_clean(server, connect):
    model = _model()
    client = connect(server, **CLIENT)
    client.create_model(model, ADAM)
    client.pull(["embed", "tail"], streams=1)
    with pytest.raises(NotFoundError, match="nope"):
        client.pull(["embed", "nope"], streams=3)
    # Striped pulls that cannot be taken apart are refused whole.
    bad = [
        (pb.PullRequest(packed_chunks=True, stripes=1), "2 to 64 stripes"),
        (pb.PullRequest(packed_chunks=True, stripe=2, stripes=2), "2 to 64 stripes"),
        (pb.PullRequest(packed_chunks=True, stripe=1), "2 to 64 stripes"),
        (pb.PullRequest(packed_chunks=True, stripes=65), "2 to 64 stripes"),
        (pb.PullRequest(stripe=0, stripes=2), "packed_chunks"),
        (
            pb.PullRequest(packed_chunks=True, stripes=2, scope=pb.PULL_SCOPE_OPTIMIZER_STATE),
            "not striped",
        ),
    ]
    for request, message in bad:
        expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda r=request: list(server.stub.Pull(r, timeout=TIMEOUT_S)),
            match=message,
        )


@pytest.mark.parametrize("merged", [False, True])
def test_raw_stripes_tile_the_payload(server, connect, merged):
    model = _model()
    client = connect(server, **CLIENT)
    client.create_model(model, ADAM)
    whole = list(server.stub.Pull(pb.PullRequest(packed_chunks=True), timeout=TIMEOUT_S))
    payload = b"".join(item.chunk.data for item in whole[1:])
    for stripes in (2, 3, 7, 64):
        got = b""
        for stripe in range(stripes):
            request = pb.PullRequest(
                packed_chunks=True, merged_items=merged, stripe=stripe, stripes=stripes
            )
            items = list(server.stub.Pull(request, timeout=TIMEOUT_S))
            first = items[0]
            header = first.chunk_header if first.HasField("chunk_header") else first.header
            assert list(header.tensors) == list(whole[0].header.tensors)
            start, end = header.stripe.start, header.stripe.end
            assert start == len(got)
            data = b"".join(i.chunk.data for i in items if i.WhichOneof("item") == "chunk")
            assert len(data) == end - start
            got += data
        assert got == payload


def _reply(version: int, start: int, end: int, chunks, headers) -> list:
    header = tpb.TensorStreamHeader(
        tensors=headers, version=version, stripe=tpb.PayloadRange(start=start, end=end)
    )
    return [tpb.TensorStreamItem(header=header), *chunks]


def test_replies_that_do_not_make_one_pull_are_refused():
    from paramserve import wire

    value = np.arange(10, dtype=np.float32)
    headers = [wire.header_for("w", value)]
    raw = value.tobytes()
    good = [_reply(3, 0, 16, [(0, 0, memoryview(raw[:16]))], headers)]
    good.append(_reply(3, 16, 40, [(0, 16, memoryview(raw[16:]))], headers))
    got = client_streams.receive_stripes(good)
    assert got.version == 3
    np.testing.assert_array_equal(got["w"], value)
    with pytest.raises(client_streams.StripesUnusable) as info:
        client_streams.receive_stripes([good[0], _reply(4, 16, 40, good[1][1:], headers)])
    assert not info.value.unsupported
    whole = [tpb.TensorStreamItem(header=tpb.TensorStreamHeader(tensors=headers))]
    with pytest.raises(client_streams.StripesUnusable) as info:
        client_streams.receive_stripes([whole, whole])
    assert info.value.unsupported
    # Ranges that leave a gap, and a stripe cut short, are malformed streams.
    with pytest.raises(DataLossError, match="do not cover"):
        client_streams.receive_stripes([good[0], _reply(3, 20, 40, good[1][1:], headers)])
    short = _reply(3, 16, 40, [(0, 16, memoryview(raw[16:30]))], headers)
    with pytest.raises(DataLossError, match="ended early"):
        client_streams.receive_stripes([good[0], short])
    past = _reply(3, 0, 16, [(0, 0, memoryview(raw[:20]))], headers)
    with pytest.raises(DataLossError, match="past the end of its stripe"):
        client_streams.receive_stripes([past, good[1]])
