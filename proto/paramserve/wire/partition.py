"""Where each variable of a sharded job lives: the partitioner every client shares.

A job of ``S`` shards places each variable either whole on one shard or, when it is at
least ``split_threshold_bytes`` and its optimizer's rule is row-separable, split by rows
(axis 0) into ``S`` contiguous pieces, one per shard in shard order (the first
``rows % S`` pieces one row longer), as TensorFlow's ``min_max_variable_partitioner`` does.

Whole variables go, largest first (ties by name), to the shard holding the fewest bytes so
far (ties: the lowest index), after the split pieces are counted. The result depends only
on the names, shapes, dtypes, ``S``, the threshold and whether rows may be split, so every
client computes the same layout, and so does ``paramserve snapshot reshard``.

A shard stores a split variable's piece under the variable's own name with its own rows;
the pieces of a variable, concatenated along axis 0 in shard order, are the variable. That
is how a layout is read back from the shards (:func:`layout_from_shards`).

:data:`PARTITIONER_VERSION` changes whenever the rules above change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_SPLIT_THRESHOLD_BYTES",
    "PARTITIONER_VERSION",
    "SHARD_METADATA_KEY",
    "Layout",
    "Piece",
    "Placement",
    "layout_from_shards",
    "partition",
]

PARTITIONER_VERSION = 1
# Variables of at least this many bytes are split by rows across every shard.
DEFAULT_SPLIT_THRESHOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of a variable, held by ``shard``."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class Placement:
    """One variable of the job: its global shape and dtype, and the pieces holding it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def split(self) -> bool:
        """Whether the variable is split by rows (else one piece holds it whole)."""
        return len(self.pieces) > 1

    def local_shape(self, piece: Piece) -> tuple[int, ...]:
        """The shape of ``piece`` as its shard stores it."""
        if not self.split:
            return self.shape
        return (piece.stop - piece.start, *self.shape[1:])

    def to_json(self) -> dict[str, object]:
        """A JSON-able dict (``describe()`` and ``paramserve status`` show it)."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "pieces": [[p.shard, p.start, p.stop] for p in self.pieces],
        }


@dataclass(frozen=True)
class Layout:
    """The placement of every variable of a job of ``shards`` shards, in model order."""

    shards: int
    placements: tuple[Placement, ...]

    def by_name(self) -> dict[str, Placement]:
        """The placements keyed by variable name."""
        return {p.name: p for p in self.placements}

    def shard_variables(self, shard: int) -> list[tuple[Placement, Piece]]:
        """The variables (and pieces) ``shard`` holds, in model order."""
        return [(p, piece) for p in self.placements for piece in p.pieces if piece.shard == shard]

    def shard_bytes(self) -> list[int]:
        """Bytes held by each shard."""
        held = [0] * self.shards
        for p in self.placements:
            row_bytes = _nbytes(p.shape[1:], p.dtype)
            for piece in p.pieces:
                held[piece.shard] += (
                    (piece.stop - piece.start) * row_bytes if p.split else _nbytes(p.shape, p.dtype)
                )
        return held

    def to_json(self) -> dict[str, object]:
        """A JSON-able dict of the whole layout."""
        return {
            "partitioner_version": PARTITIONER_VERSION,
            "shards": self.shards,
            "variables": [p.to_json() for p in self.placements],
        }


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _rows(count: int, shards: int) -> list[tuple[int, int]]:
    base, extra = divmod(count, shards)
    bounds, start = [], 0
    for shard in range(shards):
        stop = start + base + (1 if shard < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def partition(
    variables: Mapping[str, tuple[str, Sequence[int]]],
    shards: int,
    *,
    split_threshold_bytes: int = DEFAULT_SPLIT_THRESHOLD_BYTES,
    split_rows: bool = True,
) -> Layout:
    """The layout of ``variables`` (``{name: (dtype name, shape)}``, in model order).

    ``split_rows=False`` (an optimizer whose rule reads a whole variable: Lamb, Muon,
    Adafactor, or ``clipnorm``) keeps every variable whole. ValueError when a shard would
    hold nothing: a shard without variables could not count the job's steps.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"a job needs at least one shard; got shards={shards!r}")
    if split_threshold_bytes < 1:
        raise ValueError(f"split_threshold_bytes must be >= 1; got {split_threshold_bytes}")
    specs = {n: (np.dtype(d).name, tuple(int(x) for x in s)) for n, (d, s) in variables.items()}
    pieces: dict[str, tuple[Piece, ...]] = {}
    load = [0] * shards
    whole = []
    for name, (dtype, shape) in specs.items():
        size = _nbytes(shape, dtype)
        if (
            shards > 1
            and split_rows
            and shape
            and shape[0] >= shards
            and size >= split_threshold_bytes
        ):
            bounds = _rows(shape[0], shards)
            pieces[name] = tuple(Piece(s, a, b) for s, (a, b) in enumerate(bounds))
            row_bytes = _nbytes(shape[1:], dtype)
            for s, (a, b) in enumerate(bounds):
                load[s] += (b - a) * row_bytes
        else:
            whole.append((-size, name))
    for negative_size, name in sorted(whole):
        shard = min(range(shards), key=lambda s: (load[s], s))
        load[shard] -= negative_size
        pieces[name] = (Piece(shard, 0, specs[name][1][0] if specs[name][1] else 1),)
    layout = Layout(
        shards,
        tuple(Placement(n, d, s, pieces[n]) for n, (d, s) in specs.items()),
    )
    empty = [s for s in range(shards) if not layout.shard_variables(s)]
    if empty:
        raise ValueError(
            f"{len(specs)} variables cannot fill {shards} shards (shards {empty} would hold "
            "none): use fewer shards, or a split_threshold_bytes small enough to split the "
            "largest variables by rows"
        )
    return layout


def layout_from_shards(shard_specs: Sequence[Mapping[str, tuple[str, Sequence[int]]]]) -> Layout:
    """The layout a job's shards hold, from each shard's ``{name: (dtype, local shape)}``.

    A name held by several shards is a variable split by rows, its pieces in shard order;
    the model order is the order of first appearance. ValueError when the pieces do not
    fit together (another job's shard, or shards given out of order).
    """
    found: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
    for shard, specs in enumerate(shard_specs):
        for name, (dtype, shape) in specs.items():
            found.setdefault(name, []).append(
                (shard, np.dtype(dtype).name, tuple(int(x) for x in shape))
            )
    placements = []
    for name, held in found.items():
        if len(held) == 1:
            shard, dtype, shape = held[0]
            placements.append(
                Placement(name, dtype, shape, (Piece(shard, 0, shape[0] if shape else 1),))
            )
            continue
        dtypes = {d for _, d, _ in held}
        tails = {s[1:] for _, _, s in held}
        if len(dtypes) > 1 or len(tails) > 1 or any(not s for _, _, s in held):
            raise ValueError(
                f"variable {name!r} is on shards {[s for s, _, _ in held]} with dtypes and "
                f"shapes {[f'{d}{list(s)}' for _, d, s in held]}, which are not row pieces of "
                "one variable: are these shards of one job, given in shard order?"
            )
        if [s for s, _, _ in held] != list(range(len(shard_specs))):
            raise ValueError(
                f"variable {name!r} is split over shards {[s for s, _, _ in held]}, not over "
                f"every one of the {len(shard_specs)} shards"
            )
        rows = [s[0] for _, _, s in held]
        starts = np.concatenate([[0], np.cumsum(rows)]).tolist()
        placements.append(
            Placement(
                name,
                held[0][1],
                (int(starts[-1]), *held[0][2][1:]),
                tuple(Piece(s, int(starts[s]), int(starts[s + 1])) for s in range(len(rows))),
            )
        )
    return Layout(len(shard_specs), tuple(placements))


# The metadata a sharded client sends with every call: "INDEX/SHARDS", its view of the job.
SHARD_METADATA_KEY = "paramserve-shard"
