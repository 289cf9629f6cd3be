"""One job on 3 shards computes what one server computes, bit for bit, for every optimizer.

Real servers on loopback ports; the same gradients go to a one-server job and a 3-shard job
(with a split threshold low enough that row-separable optimizers split the embedding), and
the weights and every optimizer slot must be equal after each run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import Client, FailedPreconditionError, NotFoundError
from paramserve.client.remote import RemoteOptimizer
from paramserve.client.sharded import ShardedClient
from tests.support.servers import LocalServer, LocalServers

SHAPES = {
    "embedding": (48, 8),
    "dense/kernel": (8, 6),
    "dense/bias": (6,),
    "out/kernel": (6, 3),
    "out/bias": (3,),
}
SPLIT_BYTES = 1024  # the embedding (1536 bytes) splits; nothing else does
STEPS = 4

OPTIMIZERS: list[tuple[str, Any]] = [
    ("SGD-nesterov", lambda: optim_core.SGD(0.05, momentum=0.9, nesterov=True)),
    ("RMSprop-centered", lambda: optim_core.RMSprop(0.01, momentum=0.5, centered=True)),
    ("Adam-amsgrad", lambda: optim_core.Adam(0.01, amsgrad=True)),
    ("AdamW", lambda: optim_core.AdamW(0.01, weight_decay=0.05)),
    ("Adadelta", lambda: optim_core.Adadelta(1.0)),
    ("Adagrad", lambda: optim_core.Adagrad(0.1)),
    ("Adamax", lambda: optim_core.Adamax(0.01)),
    ("Nadam", lambda: optim_core.Nadam(0.01)),
    (
        "Ftrl",
        lambda: optim_core.Ftrl(
            0.05, l1_regularization_strength=0.01, l2_regularization_strength=0.02
        ),
    ),
    ("Lion", lambda: optim_core.Lion(0.001)),
    ("Lamb", lambda: optim_core.Lamb(0.01)),
    ("Adafactor", lambda: optim_core.Adafactor(0.1)),
    ("Muon", lambda: optim_core.Muon(0.01)),
    ("ScheduleFreeAdamW", lambda: optim_core.ScheduleFreeAdamW(0.01)),
    (
        "Adam-ema-decay",
        lambda: optim_core.Adam(0.01, weight_decay=0.01, use_ema=True, ema_overwrite_frequency=3),
    ),
    ("Adam-accumulate", lambda: optim_core.Adam(0.01, gradient_accumulation_steps=2)),
    ("Adam-clipnorm", lambda: optim_core.Adam(0.01, clipnorm=0.5)),
    ("SGD-clipvalue", lambda: optim_core.SGD(0.1, clipvalue=0.01)),
]


@pytest.fixture(scope="module")
def jobs() -> Iterator[dict[str, Any]]:
    """A one-server job and a 3-shard job per mode, on loopback ports, for the module."""
    servers = LocalServers({})
    try:
        found: dict[str, Any] = {}
        for mode in ("sync", "async"):
            one = servers.start(mode=mode)
            shards = [servers.start(mode=mode, shards=3, shard_index=i) for i in range(3)]
            found[mode] = (one, shards)
        yield found
    finally:
        servers.stop_all()


def _initial(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _gradients(step: int, worker: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(1000 + 17 * step + worker)
    grads: dict[str, Any] = {
        n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()
    }
    if step % 2:
        # Sparse rows of the embedding, with a repeat, spanning every shard's piece.
        rows = np.array([1, 20, 20, 47, 30])
        grads["embedding"] = (rows, rng.standard_normal((len(rows), 8)).astype(np.float32))
    return grads


def _train(
    client: Client, optimizer: Any, *, use_step: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    client.create_model(_initial(), optimizer)
    for step in range(STEPS):
        grads = _gradients(step)
        if use_step:
            client.step(grads)
        else:
            client.push(grads)
            client.pull()
    weights = client.pull()
    state = client.optimizer_state()
    client.delete_model()
    return dict(weights), dict(state)


def _clients(one: LocalServer, shards: list[LocalServer]) -> tuple[Client, ShardedClient]:
    single = Client(one.address, worker_id="w0", timeout_s=30)
    sharded = Client(
        [s.address for s in shards], worker_id="w0", timeout_s=30, split_threshold_bytes=SPLIT_BYTES
    )
    assert isinstance(sharded, ShardedClient)
    return single, sharded


def _assert_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name, strict=True)


@pytest.mark.parametrize("name, make", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_three_shards_equal_one_server(
    jobs: dict[str, Any], mode: str, name: str, make: Any
) -> None:
    one, shards = jobs[mode]
    single, sharded = _clients(one, shards)
    with single, sharded:
        use_step = len(name) % 2 == 0  # half the cases through step(), half push + pull
        expected = _train(single, make(), use_step=use_step)
        sharded_result = _train(sharded, make(), use_step=use_step)
    _assert_equal(expected[0], sharded_result[0])
    _assert_equal(expected[1], sharded_result[1])


@pytest.mark.parametrize(
    "make, splits",
    [
        (lambda: optim_core.Adam(0.01), True),
        (lambda: optim_core.Lamb(0.01), False),
        (lambda: optim_core.SGD(0.1, clipnorm=1.0), False),
    ],
    ids=["Adam", "Lamb", "SGD-clipnorm"],
)
def test_layout_splits_only_row_separable_rules(
    jobs: dict[str, Any], make: Any, splits: bool
) -> None:
    _, shards = jobs["sync"]
    with Client([s.address for s in shards], split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(_initial(), make())
        try:
            description = client.describe()
            assert description.layout is not None
            assert description.layout.by_name()["embedding"].split is splits
            # The shards hold their variables in model order; the job lists them shard by
            # shard (the order of first appearance), each with its whole shape.
            assert sorted(description.variable_names) == sorted(SHAPES)
            assert {v.name: v.shape for v in description.variables} == SHAPES
            # Every shard holds at least one variable; each split piece is its rows.
            held = [
                s.stub.Describe(_request(), metadata=_view(i)).variables
                for i, s in enumerate(shards)
            ]
            assert all(held)
        finally:
            client.delete_model()


def _request() -> Any:
    from paramserve.v1 import parameter_server_pb2 as pb

    return pb.DescribeRequest()


def _view(index: int) -> tuple[tuple[str, str], ...]:
    return (("paramserve-shard", f"{index}/3"),)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim_core.Adam(0.01, global_clipnorm=1.0), "global_clipnorm"),
        (lambda: optim_core.LossScaleOptimizer(optim_core.SGD(0.1)), "LossScaleOptimizer"),
    ],
    ids=["global_clipnorm", "LossScaleOptimizer"],
)
def test_cross_variable_options_are_refused_before_anything_is_created(
    jobs: dict[str, Any], make: Any, match: str
) -> None:
    _, shards = jobs["sync"]
    with Client([s.address for s in shards]) as client:
        with pytest.raises(ValueError, match=match):
            client.create_model(_initial(), make())
        with pytest.raises(NotFoundError):
            client.describe()


def test_remote_optimizer_works_over_a_sharded_client(jobs: dict[str, Any]) -> None:
    one, shards = jobs["sync"]
    single, sharded = _clients(one, shards)
    results = []
    with single, sharded:
        for client in (single, sharded):
            params = _initial()
            client.create_model(params, optim_core.Adam(0.01))
            optimizer = RemoteOptimizer(client)
            for step in range(3):
                grads = {n: g for n, g in _gradients(step * 2).items()}
                optimizer.apply_gradients((grads[n], params[n]) for n in SHAPES)
            results.append(params)
            client.delete_model()
    _assert_equal(results[0], results[1])


def test_row_pulls_and_out_arrays_put_pieces_back_together(jobs: dict[str, Any]) -> None:
    _, shards = jobs["sync"]
    initial = _initial(3)
    with Client([s.address for s in shards], split_threshold_bytes=SPLIT_BYTES) as client:
        client.create_model(initial, optim_core.SGD(0.1))
        try:
            rows = [47, 0, 16, 16, 33]
            picked = client.pull(rows={"embedding": rows})
            np.testing.assert_array_equal(picked["embedding"].indices, rows)
            np.testing.assert_array_equal(picked["embedding"].values, initial["embedding"][rows])
            out = {"embedding": np.zeros((48, 8), np.float32), "out/bias": np.zeros(3, np.float32)}
            pulled = client.pull(["embedding", "out/bias"], out=out)
            assert pulled["embedding"] is out["embedding"]
            np.testing.assert_array_equal(out["embedding"], initial["embedding"])
            np.testing.assert_array_equal(out["out/bias"], initial["out/bias"])
            with pytest.raises(ValueError, match="shape"):
                client.push({"embedding": np.zeros((47, 8), np.float32)})
            with pytest.raises(NotFoundError, match="nope"):
                client.pull(["nope"])
        finally:
            client.delete_model()


def test_a_client_that_sees_the_job_otherwise_is_refused(jobs: dict[str, Any]) -> None:
    one, shards = jobs["sync"]
    addresses = [s.address for s in shards]
    with Client(addresses) as client:
        client.create_model(_initial(), optim_core.Adam(0.01))
    try:
        for wrong in (
            [addresses[1], addresses[0], addresses[2]],
            addresses[:2],
            [*addresses, one.address],
        ):
            with (
                Client(wrong, timeout_s=10) as client,
                pytest.raises(FailedPreconditionError) as info,
            ):
                client.describe()
            assert info.value.reason == "SHARD_MISMATCH"
        with (
            Client(addresses[1], timeout_s=10) as plain,
            pytest.raises(FailedPreconditionError, match="shard 1 of a job of 3"),
        ):
            plain.pull()
        # A one-server job refuses a client that thinks it is a shard of a larger one.
        with (
            Client([one.address, addresses[0]], timeout_s=10) as client,
            pytest.raises(FailedPreconditionError),
        ):
            client.describe()
    finally:
        with Client(addresses) as client:
            client.delete_model()
