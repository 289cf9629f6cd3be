"""The partitioner every sharded client shares: deterministic, balanced, row splits."""

from __future__ import annotations

import numpy as np
import pytest

from paramserve.wire.partition import PARTITIONER_VERSION, layout_from_shards, partition

SPECS = {
    "embedding": ("float32", (1000, 16)),  # 64,000 bytes
    "dense/kernel": ("float32", (16, 8)),  # 512 bytes
    "dense/bias": ("float32", (8,)),
    "head/kernel": ("float32", (8, 4)),
    "head/bias": ("float32", (4,)),
    "scale": ("float64", ()),
}


def test_large_variables_are_split_by_rows_in_shard_order() -> None:
    layout = partition(SPECS, 3, split_threshold_bytes=10_000)
    emb = layout.by_name()["embedding"]
    assert emb.split
    assert [(p.shard, p.start, p.stop) for p in emb.pieces] == [
        (0, 0, 334),
        (1, 334, 667),
        (2, 667, 1000),
    ]
    assert emb.local_shape(emb.pieces[2]) == (333, 16)
    # Everything else is whole, and every variable appears once, in model order.
    assert [p.name for p in layout.placements] == list(SPECS)
    assert all(not p.split for p in layout.placements if p.name != "embedding")


def test_whole_variables_go_largest_first_to_the_lightest_shard() -> None:
    layout = partition(SPECS, 3, split_threshold_bytes=1 << 30)
    shard_of = {p.name: p.pieces[0].shard for p in layout.placements}
    assert shard_of["embedding"] == 0  # largest first, to shard 0
    assert shard_of["dense/kernel"] == 1
    assert shard_of["head/kernel"] == 2
    held = layout.shard_bytes()
    assert sum(held) == sum(int(np.prod(s)) * np.dtype(d).itemsize for d, s in SPECS.values())


def test_the_layout_depends_only_on_its_inputs() -> None:
    shuffled = dict(reversed(list(SPECS.items())))
    a = partition(SPECS, 4, split_threshold_bytes=1000)
    b = partition(SPECS, 4, split_threshold_bytes=1000)
    assert a == b
    # Model order is kept; placement is by size and name, not by the order given.
    c = partition(shuffled, 4, split_threshold_bytes=1000)
    assert {p.name: p.pieces for p in c.placements} == {p.name: p.pieces for p in a.placements}
    assert a.to_json()["partitioner_version"] == PARTITIONER_VERSION


def test_no_splits_when_the_optimizer_reads_whole_variables() -> None:
    layout = partition(SPECS, 3, split_threshold_bytes=100, split_rows=False)
    assert not any(p.split for p in layout.placements)


def test_a_variable_with_fewer_rows_than_shards_stays_whole() -> None:
    layout = partition(
        {"a": ("float32", (2, 1000)), "b": ("float32", (3,)), "c": ("float32", (3,))},
        3,
        split_threshold_bytes=10,
    )
    assert not layout.by_name()["a"].split


def test_a_shard_left_empty_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot fill 3 shards"):
        partition({"a": ("float32", (2,)), "b": ("float32", (2,))}, 3)


@pytest.mark.parametrize("shards", [0, -1, True])
def test_bad_shard_counts_are_refused(shards: object) -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        partition(SPECS, shards)  # type: ignore[arg-type]


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_layout_read_back_from_the_shards(shards: int) -> None:
    layout = partition(SPECS, shards, split_threshold_bytes=500)
    per_shard = [
        {p.name: (p.dtype, p.local_shape(piece)) for p, piece in layout.shard_variables(s)}
        for s in range(shards)
    ]
    back = layout_from_shards(per_shard)
    assert back.by_name() == layout.by_name()


def test_pieces_that_do_not_fit_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not row pieces of one variable"):
        layout_from_shards([{"a": ("float32", (2, 3))}, {"a": ("float32", (2, 4))}])
    with pytest.raises(ValueError, match="not over every one"):
        layout_from_shards(
            [{"a": ("float32", (2, 3))}, {"a": ("float32", (2, 3))}, {"b": ("float32", (1,))}]
        )
