"""Many variables: packed chunks both ways, slabs on the server, bulk checks.

Small tensors share chunk messages (a chunk runs on into the tensors after the one it
names), the server keeps same-dtype variables in flat slabs and applies a push that covers
a slab whole in one optimizer call. Everything here is checked bit for bit against a local
optim_core replay that goes variable by variable, and every refusal leaves the state as it
was.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from paramserve import optim_core, wire
from paramserve.client import Client
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.asserts import assert_same, expect_error
from tests.support.wire import TIMEOUT_S, read_stream

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


def _model(n_small: int = 200, *, big: int = 5000, seed: int = 0) -> dict[str, np.ndarray]:
    """Many tiny variables (sizes 1 to 7, a scalar among them) with two large ones between."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(n_small):
        if i == n_small // 3:
            out["big/a"] = rng.standard_normal((big // 50, 50)).astype(np.float32)
        if i == 2 * n_small // 3:
            out["big/b"] = rng.standard_normal(big).astype(np.float32)
        shape = () if i == 5 else (i % 7 + 1,)
        out[f"layer{i:03d}/w"] = rng.standard_normal(shape).astype(np.float32)
    return out


def _grads(model: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return {n: (rng.standard_normal(v.shape) * 0.1).astype(v.dtype) for n, v in model.items()}


class Replay:
    """The same optimizer, variable by variable, on plain (unpacked) local variables."""

    def __init__(self, model: dict[str, np.ndarray], optimizer: dict = ADAM) -> None:
        self.variables = {n: optim_core.Variable(v.copy(), path=n) for n, v in model.items()}
        self.optimizer = optim_core.get(optimizer)
        self.optimizer.use_slabs = False
        self.optimizer.build(list(self.variables.values()))

    def apply(self, grads: dict) -> None:
        names = list(grads)
        self.optimizer.apply([grads[n] for n in names], [self.variables[n] for n in names])

    def weights(self) -> dict[str, np.ndarray]:
        return {n: v.value for n, v in self.variables.items()}


@pytest.fixture
def server(start_server):
    return start_server(mode="async")


@pytest.fixture
def applied_whole(monkeypatch) -> list[int]:
    """How many variables each apply of the store took through whole slabs."""
    from paramserve.server.store import ModelStore

    seen: list[int] = []
    apply = ModelStore.apply

    def spy(self, grads):
        seen.append(sum(len(s.variables) for s in getattr(grads, "slabs", {}) or {}))
        return apply(self, grads)

    monkeypatch.setattr(ModelStore, "apply", spy)
    return seen


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])
def test_many_tiny_tensors_and_large_ones_round_trip(server, connect, chunk_bytes, applied_whole):
    model = _model()
    client = connect(server, chunk_bytes=chunk_bytes)
    client.create_model(model, ADAM)
    replay = Replay(model)
    assert_same(client.pull(), model)
    out = {n: np.empty_like(v) for n, v in model.items()}
    for step in range(3):
        grads = _grads(model, step)
        client.push(grads)
        replay.apply(grads)
        pulled = client.pull(out=out)
        assert all(pulled[n] is out[n] for n in model)
        assert_same(pulled, replay.weights())
    assert_same(client.pull(), replay.weights())  # fresh arrays, views of one buffer
    assert applied_whole == [len(model)] * 3  # every variable through its slab
    pulled = client.pull()
    assert all(v.flags.writeable for v in pulled.values())


def test_sparse_rows_and_subsets_among_many_tensors(server, connect):
    model = _model(60)
    client = connect(server, chunk_bytes=256)
    client.create_model(model, ADAM)
    replay = Replay(model)
    grads = _grads(model, 0)
    rows, values = np.array([3, 0, 3]), grads["big/a"][:3]
    mixed = dict(grads)
    mixed["big/a"] = (rows, values)
    client.push(mixed)
    dense = np.zeros_like(model["big/a"])
    np.add.at(dense, rows, values)
    replay.apply({**grads, "big/a": optim_core.IndexedSlices(rows, values)})
    assert_same(client.pull(), replay.weights())
    # A subset, in another order: variable by variable on the server, as in the replay.
    names = list(model)[::-7]
    subset = {n: _grads(model, 1)[n] for n in names}
    client.push(subset)
    replay.apply(subset)
    assert_same(client.pull(), replay.weights())
    # Rows pulled beside whole variables.
    got = client.pull(names=["layer001/w"], rows={"big/a": [0, 3]})
    np.testing.assert_array_equal(got["big/a"].values, replay.weights()["big/a"][[0, 3]])
    np.testing.assert_array_equal(got["layer001/w"], replay.weights()["layer001/w"])


def test_bfloat16_on_the_wire_with_many_tensors(server, connect):
    model = _model(80)
    client = connect(server, chunk_bytes=512, wire_dtype="bfloat16", error_feedback=False)
    client.create_model(model, ADAM)
    replay = Replay(model)
    bf16 = wire.dtype_from_name("bfloat16")
    out = {n: np.empty_like(v) for n, v in model.items()}
    for step in range(2):
        grads = _grads(model, step)
        client.push(grads)
        replay.apply({n: g.astype(bf16).astype(np.float32) for n, g in grads.items()})
        pulled = client.pull(out=out)
        rounded = {n: w.astype(bf16).astype(np.float32) for n, w in replay.weights().items()}
        assert_same(pulled, rounded)
    assert_same(client.pull(wire_dtype=None), replay.weights())


def test_sync_rounds_combine_whole_slabs(start_server, connect):
    server = start_server(mode="sync", replicas=2, reduction="mean")
    model = _model(50)
    clients = [connect(server, worker_id=f"w{i}", chunk_bytes=300) for i in range(2)]
    clients[0].create_model(model, ADAM)
    replay = Replay(model)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        for step in range(3):
            grads = [_grads(model, 10 * step + i) for i in range(2)]
            # Step 0: one worker pushes everything (a whole slab), the other a part: the
            # slab is split into its variables for that round, which the replay does by
            # name. Then both push everything: the slab is combined whole.
            partial = {n: g for j, (n, g) in enumerate(grads[1].items()) if j % 2 == 0 or step}
            futures = [
                pool.submit(clients[0].push, grads[0], base_version=step),
                pool.submit(clients[1].push, partial, base_version=step),
            ]
            for f in futures:
                assert f.result().applied
            combined = {}
            for n in model:
                parts = [g[n] for g in (grads[0], partial) if n in g]
                total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
                combined[n] = total / np.float32(2)
            replay.apply(combined)
    assert_same(clients[0].pull(), replay.weights())


def test_snapshots_restore_and_optimizer_state_with_slabs(server, connect):
    model = _model(40)
    client = connect(server, chunk_bytes=128)
    client.create_model(model, ADAM)
    replay = Replay(model)
    grads = _grads(model, 0)
    client.push(grads)
    replay.apply(grads)
    snapshot = client.snapshot()
    state = client.optimizer_state()
    at_snapshot = {n: np.array(v) for n, v in client.pull().items()}
    client.push(_grads(model, 1))
    client.restore(snapshot)
    assert_same(client.pull(), at_snapshot)
    assert_same(client.optimizer_state(), state)
    grads = _grads(model, 2)
    client.push(grads)
    replay.apply(grads)
    assert_same(client.pull(), replay.weights())
    # The state written back through the slabs' views, then one more step like the replay.
    client.set_optimizer_state(client.optimizer_state())
    grads = _grads(model, 3)
    client.push(grads)
    replay.apply(grads)
    assert_same(client.pull(), replay.weights())


def _packed_push(
    headers: list[tpb.TensorHeader], pieces: list[tuple[int, int, bytes]], *, sequence: int = 1
) -> list[pb.PushRequest]:
    items = [
        pb.PushRequest(
            header=pb.PushHeader(worker_id="raw", sequence=sequence, session="s", tensors=headers)
        )
    ]
    items += [
        pb.PushRequest(chunk=tpb.TensorChunk(tensor=t, offset=o, data=d)) for t, o, d in pieces
    ]
    return [*items, pb.PushRequest(end=tpb.StreamEnd())]


def test_raw_packed_chunks_are_taken_and_bad_ones_refused(server):
    model = {f"v{i}": np.full(3, i, np.float32) for i in range(4)}  # 12 bytes each
    server.create(model, optimizer_json='{"class_name": "SGD", "config": {"learning_rate": 1.0}}')
    headers = [wire.header_for(n, v) for n, v in model.items()]
    payload = b"".join(np.ones(3, np.float32).tobytes() for _ in model)
    before = server.state()
    bad = [
        ([(0, 0, payload + b"\0" * 4)], "past the end"),  # runs past the last tensor
        ([(0, 0, payload[:20]), (1, 4, payload[16:])], "out of order"),  # repeated bytes
        ([(0, 0, payload[:20]), (0, 8, payload[20:])], "after tensor #1 began"),
        ([(0, 0, payload[:20]), (2, 0, payload[20:])], "ended early"),  # v1 skipped
        ([(0, 0, payload[:20])], "ended early"),  # cut short
    ]
    for pieces, message in bad:
        expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda p=pieces: server.stub.Push(iter(_packed_push(headers, p)), timeout=TIMEOUT_S),
            match=message,
        )
    server.assert_unchanged(before)
    # One chunk for everything, or split mid-tensor and resumed there.
    for sequence, pieces in enumerate(
        [[(0, 0, payload)], [(0, 0, payload[:17]), (1, 5, payload[17:30]), (2, 6, payload[30:])]],
        start=1,
    ):
        server.stub.Push(iter(_packed_push(headers, pieces, sequence=sequence)), timeout=TIMEOUT_S)
    version, weights = server.pull()
    assert version == 2
    for i, name in enumerate(model):
        np.testing.assert_array_equal(weights[name], np.full(3, i - 2, np.float32))


def test_pull_packs_only_when_asked(server):
    model = {f"v{i:02d}": np.full(5, i, np.float32) for i in range(30)}
    server.create(model)
    for packed, messages in ((False, 30), (True, 1)):
        items = list(server.stub.Pull(pb.PullRequest(packed_chunks=packed), timeout=TIMEOUT_S))
        assert len(items) == 1 + messages  # the header, then the chunks
        _, weights = read_stream(items)
        assert_same(weights, model)


def test_refusals_among_many_tensors_leave_the_state(server, connect):
    model = _model(100)
    client = connect(server, chunk_bytes=200)
    client.create_model(model, ADAM)
    grads = _grads(model, 0)
    client.push(grads)
    before = server.state()
    bad_values = dict(grads)
    bad_values["layer050/w"] = np.full_like(grads["layer050/w"], np.nan)
    with pytest.raises(Exception, match=r"layer050/w.*NaN"):
        client.push(bad_values)
    wrong_shape = dict(grads)
    wrong_shape["layer020/w"] = np.zeros(9, np.float32)
    with pytest.raises(Exception, match="layer020/w"):
        client.push(wrong_shape)
    unknown = dict(grads)
    unknown["nope"] = np.zeros(1, np.float32)
    with pytest.raises(Exception, match="nope"):
        client.push(unknown)
    server.assert_unchanged(before)


def test_skip_policy_drops_a_push_with_nan_in_one_small_tensor(start_server, connect):
    server = start_server(mode="async", nonfinite="skip")
    model = _model(30)
    client = connect(server, chunk_bytes=4096)
    client.create_model(model, ADAM)
    before = server.state()
    grads = _grads(model, 0)
    grads["layer007/w"] = np.full_like(grads["layer007/w"], np.inf)
    assert not client.push(grads).applied
    server.assert_unchanged(before)


def test_an_older_client_cutting_one_tensor_per_chunk_still_works(server):
    model = {f"v{i}": np.full(4, i, np.float32) for i in range(6)}
    server.create(model)  # SGD, learning rate 0.5 (tests.support.models.tiny)
    grads = {n: np.ones(4, np.float32) for n in model}
    server.push(grads)  # tests.support.wire cuts one tensor per chunk
    version, weights = server.pull()
    assert version == 1
    for name in model:
        np.testing.assert_array_equal(weights[name], model[name] - np.float32(0.5))


def test_client_reuses_checked_reply_headers(server):
    model = _model(20)
    with Client(server.address, timeout_s=TIMEOUT_S) as client:
        client.create_model(model, ADAM)
        out = {n: np.empty_like(v) for n, v in model.items()}
        client.pull(out=out)
        client.pull(out=out)
        client.pull()
        # A different array for one name is checked again (and refused if it does not fit).
        with pytest.raises(ValueError, match="layer001/w"):
            client.pull(out={**out, "layer001/w": np.empty(99, np.float32)})


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("chunk_bytes", [63, 4096])
def test_compressed_pushes_widen_packed_chunks_into_whole_slabs(
    server, connect, wire_dtype, chunk_bytes, applied_whole
):
    # Odd chunk sizes split 2-byte elements between chunks; the small tensors share them.
    model = _model(90)
    client = connect(server, chunk_bytes=chunk_bytes, wire_dtype=wire_dtype, error_feedback=False)
    client.create_model(model, ADAM)
    client.describe()  # so pulls widen into out= as they arrive
    replay = Replay(model)
    narrow = wire.dtype_from_name(wire_dtype)
    out = {n: np.empty_like(v) for n, v in model.items()}
    for step in range(2):
        grads = _grads(model, step)
        assert client.push(grads).applied
        replay.apply({n: g.astype(narrow).astype(np.float32) for n, g in grads.items()})
        pulled = client.pull(out=out)
        assert all(pulled[n] is out[n] for n in model)
        rounded = {n: w.astype(narrow).astype(np.float32) for n, w in replay.weights().items()}
        assert_same(pulled, rounded)
    # The widened gradients went through the slabs whole, as exact pushes do.
    assert applied_whole == [len(model)] * 2
    assert_same(client.pull(wire_dtype=None), replay.weights())


def test_a_nan_in_one_small_tensor_of_a_compressed_push_is_named(start_server, connect):
    for nonfinite in ("reject", "skip"):
        server = start_server(mode="async", nonfinite=nonfinite)
        model = _model(50)
        client = connect(server, chunk_bytes=101, wire_dtype="bfloat16", error_feedback=False)
        client.create_model(model, ADAM)
        before = server.state()
        grads = _grads(model, 0)
        grads["layer031/w"] = grads["layer031/w"].copy()
        grads["layer031/w"][-1] = np.nan
        if nonfinite == "skip":
            assert not client.push(grads).applied
        else:
            with pytest.raises(Exception, match=r"layer031/w.*NaN"):
                client.push(grads)
        server.assert_unchanged(before)


def test_compressed_pulls_alternating_out_arrays(server, connect):
    # The client keeps what it widens into by the out= mapping: other arrays, a subset,
    # or no out= at all each get what they asked for.
    model = _model(40)
    client = connect(server, chunk_bytes=77, wire_dtype="bfloat16")
    client.create_model(model, ADAM)
    client.describe()
    bf16 = wire.dtype_from_name("bfloat16")
    rounded = {n: v.astype(bf16).astype(np.float32) for n, v in model.items()}
    outs = [{n: np.empty_like(v) for n, v in model.items()} for _ in range(2)]
    names = list(model)[::3]
    part = {n: np.empty_like(model[n]) for n in names}
    for out in (outs[0], outs[1], outs[0], part, outs[1]):
        pulled = client.pull(names=list(out), out=out)
        assert list(pulled) == list(out)
        assert all(pulled[n] is out[n] for n in out)
        assert_same(pulled, {n: rounded[n] for n in out})
    plain = client.pull()
    assert all(plain[n] is not outs[1][n] for n in model)
    assert_same(plain, rounded)
