"""Sharded snapshots on disk, and re-sharding one offline (``paramserve snapshot reshard``).

A snapshot of a job of ``S`` shards is a directory::

    DIR/manifest.json
    DIR/shard-0.safetensors ... DIR/shard-{S-1}.safetensors

each ``shard-i.safetensors`` an ordinary snapshot file (:mod:`.snapshots`) of shard ``i``'s
part of the model, the one ``UploadSnapshot`` restores on that shard; ``manifest.json`` is::

    {"format": "paramserve.sharded_snapshot", "format_version": 1, "cut_id": str,
     "version": int, "shards": S, "partitioner_version": int, "split_threshold_bytes": int,
     "layout": Layout.to_json(), "created_at": RFC 3339,
     "files": [{"shard": i, "file": "shard-i.safetensors", "snapshot_id": str,
                "sha256": hex sha256 of the whole file, "size_bytes": int}, ...]}

:func:`reshard` reads one (the manifest, every file's size and sha256, each file checked
fully as a server loads it, and that the shards hold one job at one version), puts the
whole model back together (a split variable's pieces and its slots' pieces concatenated
along axis 0 in shard order, whole variables and their slots as they are, the step-wide
optimizer state once), places it with :func:`paramserve.wire.partition.partition` on the
new number of shards, and writes the new directory atomically: the same weights and
optimizer state bit for bit, laid out as a job of that many shards created afresh would
be, each file restorable by ``UploadSnapshot`` on its shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paramserve.optim_core import Optimizer, Variable
from paramserve.wire.partition import (
    PARTITIONER_VERSION,
    Layout,
    Piece,
    Placement,
    layout_from_shards,
    partition,
)

from . import checkpoint_dir
from .aggregation import (
    RECENT_SEQUENCES,
    check_aggregation_state,
    recent_from_ranges,
    recent_to_ranges,
)
from .errors import ParamServeError
from .model import ModelState, make_optimizer
from .snapshots import (
    SnapshotState,
    check_model_state,
    read_snapshot_file,
    utc_now,
    write_snapshot_file,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "ShardedSnapshot",
    "ShardedSnapshotError",
    "file_sha256",
    "load_sharded_snapshot",
    "merge_aggregation",
    "merge_shards",
    "read_manifest",
    "reshard",
    "reshard_upload",
    "resharded_parts",
    "shard_file_name",
    "split_model",
    "write_sharded_snapshot",
]

FORMAT = "paramserve.sharded_snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ShardedSnapshotError(ValueError):
    """A sharded snapshot directory that cannot be read, or cannot be written as asked."""


def shard_file_name(shard: int) -> str:
    """The name of shard ``shard``'s snapshot file in a sharded snapshot directory."""
    return f"shard-{shard}.safetensors"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardedSnapshot:
    """A sharded snapshot read and checked: the manifest, the layout, each shard's state."""

    directory: Path
    manifest: dict[str, Any]
    layout: Layout
    states: list[SnapshotState]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


# --- reading -------------------------------------------------------------------------------
def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ShardedSnapshotError(f"{what} must be an integer >= {minimum}; got {value!r:.80}")
    return value


def _layout_from_json(data: Any, shards: int, label: str) -> Layout:
    """The :class:`Layout` of ``Layout.to_json()`` output, checked piece by piece."""
    if not isinstance(data, dict) or not isinstance(data.get("variables"), list):
        raise ShardedSnapshotError(f"{label}: layout must be an object with a variables list")
    if data.get("shards") != shards:
        raise ShardedSnapshotError(
            f"{label}: the layout is for {data.get('shards')!r} shards, the manifest says {shards}"
        )
    placements = []
    for entry in data["variables"]:
        try:
            name, dtype = entry["name"], np.dtype(entry["dtype"]).name
            shape = tuple(_int(d, "a dimension", 0) for d in entry["shape"])
            pieces = tuple(
                Piece(*(_int(x, "a piece bound", 0) for x in p)) for p in entry["pieces"]
            )
            if not isinstance(name, str) or not pieces:
                raise TypeError(name)
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardedSnapshotError(
                f"{label}: malformed layout entry {entry!r:.200}: {exc}"
            ) from None
        placements.append(Placement(name, dtype, shape, pieces))
    names = [p.name for p in placements]
    if len(set(names)) != len(names):
        raise ShardedSnapshotError(f"{label}: the layout names a variable twice")
    return Layout(shards, tuple(placements))


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``DIR/manifest.json``, its fields checked (not yet the files it lists)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardedSnapshotError(
            f"{directory} is not a sharded snapshot: it has no {MANIFEST}"
        ) from None
    except (OSError, ValueError) as exc:
        raise ShardedSnapshotError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardedSnapshotError(
            f"{path} is not a sharded snapshot manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT!r})"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardedSnapshotError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this paramserve reads {FORMAT_VERSION})"
        )
    shards = _int(manifest.get("shards"), f"{path}: shards", 1)
    _int(manifest.get("version"), f"{path}: version", 0)
    _int(manifest.get("split_threshold_bytes"), f"{path}: split_threshold_bytes", 1)
    partitioner = _int(manifest.get("partitioner_version"), f"{path}: partitioner_version", 1)
    if partitioner > PARTITIONER_VERSION:
        raise ShardedSnapshotError(
            f"{path}: partitioner_version {partitioner} is newer than this paramserve's "
            f"({PARTITIONER_VERSION}): re-shard it with the paramserve that wrote it"
        )
    for key in ("cut_id", "created_at"):
        if not isinstance(manifest.get(key), str):
            raise ShardedSnapshotError(f"{path}: {key} must be a string")
    files = manifest.get("files")
    if not isinstance(files, list) or len(files) != shards:
        raise ShardedSnapshotError(f"{path}: files must list the {shards} shards' files")
    for index, entry in enumerate(files):
        ok = (
            isinstance(entry, dict)
            and entry.get("shard") == index
            and entry.get("file") == shard_file_name(index)
            and isinstance(entry.get("snapshot_id"), str)
            and isinstance(entry.get("sha256"), str)
            and _SHA256_RE.fullmatch(entry["sha256"]) is not None
            and isinstance(entry.get("size_bytes"), int)
            and not isinstance(entry["size_bytes"], bool)
        )
        if not ok:
            raise ShardedSnapshotError(
                f"{path}: files[{index}] must be {{shard: {index}, file: "
                f"{shard_file_name(index)!r}, snapshot_id, sha256, size_bytes}}; "
                f"got {entry!r:.200}"
            )
    _layout_from_json(manifest.get("layout"), shards, str(path))
    return manifest


def _check_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every listed file is there with its size and sha256 (before any is read)."""
    for entry in manifest["files"]:
        path = directory / entry["file"]
        label = f"shard {entry['shard']}'s file {path}"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardedSnapshotError(f"{label} is missing") from None
        if size != entry["size_bytes"]:
            raise ShardedSnapshotError(
                f"{label} has {size} bytes, the manifest says {entry['size_bytes']} "
                "(truncated, or not the file the manifest lists)"
            )
        if file_sha256(path) != entry["sha256"]:
            raise ShardedSnapshotError(
                f"{label} fails its sha256 check (corrupt, or changed since the manifest was "
                "written)"
            )


def load_sharded_snapshot(directory: str | os.PathLike[str]) -> ShardedSnapshot:
    """Read a sharded snapshot directory and check that it holds one job at one version.

    ShardedSnapshotError for anything wrong: the manifest, a missing, truncated or changed
    file, a file that does not load as a snapshot, shards that disagree on the version, the
    model name, the optimizer config or the layout.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_files(directory, manifest)
    states = []
    for entry in manifest["files"]:
        label = f"shard {entry['shard']} ({directory / entry['file']})"
        try:
            states.append(read_snapshot_file(directory / entry["file"], label))
        except ParamServeError as exc:
            raise ShardedSnapshotError(str(exc)) from None
    first = states[0].model
    versions = [s.model.version for s in states]
    if len(set(versions)) > 1 or versions[0] != manifest["version"]:
        raise ShardedSnapshotError(
            f"the shards are at versions {versions} and the manifest says "
            f"{manifest['version']}: these files are not one cut of the job"
        )
    for index, state in enumerate(states[1:], start=1):
        if state.model.model_name != first.model_name:
            raise ShardedSnapshotError(
                f"shard {index} holds model {state.model.model_name!r}, shard 0 holds "
                f"{first.model_name!r}: these files are not one job"
            )
        if state.model.optimizer != first.optimizer:
            raise ShardedSnapshotError(
                f"shard {index}'s optimizer config differs from shard 0's: these files are "
                "not one job"
            )
    manifest_layout = _layout_from_json(manifest["layout"], manifest["shards"], MANIFEST)
    try:
        found = {
            p.name: p
            for p in _layout_of_states(states).placements  # the order of first appearance
        }
    except ValueError as exc:
        raise ShardedSnapshotError(f"the shards' variables do not fit together: {exc}") from None
    listed = manifest_layout.by_name()
    if set(found) != set(listed) or any(found[n] != listed[n] for n in listed):
        differ = sorted(n for n in set(found) | set(listed) if found.get(n) != listed.get(n))
        raise ShardedSnapshotError(
            f"the layout in {MANIFEST} does not match the variables the shard files hold "
            f"(variables {differ[:8]})"
        )
    # The manifest's order is the job's model order (the files only give each shard's).
    return ShardedSnapshot(directory, manifest, manifest_layout, states)


def _layout_of_states(states: Sequence[SnapshotState]) -> Layout:
    return layout_from_shards(
        [{n: (a.dtype.name, a.shape) for n, a in s.model.variables.items()} for s in states]
    )


# --- one model out of the shards, and back into shards ------------------------------------
def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit the same array (NaN equals NaN, -0.0 differs from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _state_specs(optimizer: Optimizer) -> dict[str, tuple[str | None, Variable]]:
    """``{state key: (owner, slot)}`` in state_dict order."""
    owners = optimizer.state_owners()
    return dict(zip(owners, zip(owners.values(), optimizer.variables, strict=True), strict=True))


def _built(config: dict[str, Any], variables: Mapping[str, np.ndarray]) -> Optimizer:
    """The optimizer of ``config`` built over ``variables`` (they are not copied)."""
    optimizer = make_optimizer(config)
    optimizer.build([Variable(a, path=n) for n, a in variables.items()])
    return optimizer


def merge_aggregation(tables: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The aggregation (dedupe) state of the whole job from each shard's, shard 0 first.

    Round counters: shard 0's. It is a sync job's coordinator: it alone decides the rounds
    and counts the aborted ones, and every shard counts the rounds it applies, the same
    ones at one version.

    Workers: for each worker, the entry of the shard that saw its highest sequence (on a
    tie the lowest index, shard 0), with the recent sequences that took effect on any shard
    added (within the window a server keeps). In a sync job every shard records the same
    round members, committed to shard 0 and applied on the others, so at one version this
    is shard 0's table. In async and stale jobs each shard records a push when its part
    arrives: a cut taken while a push was in flight may hold it on some shards only. It
    counts as taken effect on every new shard, so that a resend is acknowledged as a
    duplicate rather than applied a second time to the rows that already had it (at most
    once, as an async push already is when a shard fails).
    """
    checked = [check_aggregation_state(t) for t in tables]
    workers: dict[str, dict[str, Any]] = {}
    for table in checked:
        for worker_id, info in table["workers"].items():
            held = workers.get(worker_id)
            if held is None or info["last_sequence"] > held["last_sequence"]:
                workers[worker_id] = dict(info)
    for worker_id, info in workers.items():
        last = info["last_sequence"]
        recent = recent_from_ranges(info["recent"])
        for table in checked:
            other = table["workers"].get(worker_id)
            if other is None:
                continue
            for sequence, session in recent_from_ranges(other["recent"]).items():
                if last - 2 * RECENT_SEQUENCES < sequence <= last:
                    recent.setdefault(sequence, session)
        info["recent"] = recent_to_ranges(recent)
    first = checked[0]
    return check_aggregation_state(
        {
            "format_version": first["format_version"],
            "workers": {w: workers[w] for w in sorted(workers)},
            "rounds_completed": first["rounds_completed"],
            "rounds_aborted": first["rounds_aborted"],
            "rounds_partial": first["rounds_partial"],
        }
    )


def merge_shards(snapshot: ShardedSnapshot) -> SnapshotState:
    """The whole job's model as one server would hold it (variables in the layout's order).

    A split variable and each of its slots are their pieces concatenated along axis 0 in
    shard order; the step-wide optimizer state (iteration count, learning rate, ...) must
    be the same on every shard and is taken once. Which slot belongs to which variable is
    :meth:`~paramserve.optim_core.Optimizer.state_owners` of the optimizer built over the
    whole model.
    """
    states = snapshot.states
    first = states[0].model
    variables: dict[str, np.ndarray] = {}
    for placement in snapshot.layout.placements:
        pieces = [states[p.shard].model.variables[placement.name] for p in placement.pieces]
        variables[placement.name] = np.concatenate(pieces, axis=0) if placement.split else pieces[0]
    try:
        optimizer = _built(first.optimizer, variables)
    except (ParamServeError, ValueError, TypeError) as exc:
        raise ShardedSnapshotError(
            f"the optimizer cannot be built over the whole model: {exc}"
        ) from None
    specs = _state_specs(optimizer)
    by_name = snapshot.layout.by_name()
    for index, state in enumerate(states):
        held = {p.name for p, _ in snapshot.layout.shard_variables(index)}
        for key in state.model.optimizer_state:
            if key not in specs:
                raise ShardedSnapshotError(
                    f"shard {index} holds optimizer state {key!r}, which the optimizer of the "
                    "whole model does not keep"
                )
            owner = specs[key][0]
            if owner is not None and owner not in held:
                raise ShardedSnapshotError(
                    f"shard {index} holds optimizer state {key!r} of {owner!r}, a variable "
                    "it does not hold"
                )
    optimizer_state: dict[str, np.ndarray] = {}
    for key, (owner, slot) in specs.items():
        if owner is None:
            value = _step_wide(key, slot, [s.model.optimizer_state for s in states])
        else:
            placement = by_name[owner]
            pieces = []
            for piece in placement.pieces:
                part = states[piece.shard].model.optimizer_state.get(key)
                if part is None:
                    raise ShardedSnapshotError(
                        f"shard {piece.shard} holds {owner!r} but not its optimizer state {key!r}"
                    )
                if placement.split and (
                    part.ndim == 0 or part.shape[0] != piece.stop - piece.start
                ):
                    raise ShardedSnapshotError(
                        f"shard {piece.shard}'s optimizer state {key!r} has shape "
                        f"{list(part.shape)}, not the {piece.stop - piece.start} rows of its "
                        f"piece of {owner!r}"
                    )
                pieces.append(part)
            value = np.concatenate(pieces, axis=0) if placement.split else pieces[0]
        if value.shape != slot.shape or value.dtype != slot.dtype:
            raise ShardedSnapshotError(
                f"optimizer state {key!r} is {value.dtype.name} {list(value.shape)} put "
                f"together, the optimizer keeps it as {slot.dtype.name} {list(slot.shape)}"
            )
        optimizer_state[key] = value
    model = ModelState(
        model_name=first.model_name,
        optimizer=first.optimizer,
        variables=variables,
        optimizer_state=optimizer_state,
        version=first.version,
    )
    return SnapshotState(
        model=model,
        aggregation=merge_aggregation([s.aggregation for s in states]),
        created_at=snapshot.manifest["created_at"],
    )


def _show(value: np.ndarray) -> str:
    """A scalar's value, or an array's dtype and shape, for a message."""
    return str(value[()]) if value.ndim == 0 else f"{value.dtype.name} {list(value.shape)}"


def _step_wide(key: str, slot: Variable, shard_states: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The value of step-wide state ``key``: the same on every shard, bit for bit.

    Shards keeping it in different dtypes (Nadam's momentum-cache product is kept in the
    dtype of a shard's first variable) are compared within each dtype; the value kept in
    the whole model's dtype wins, else shard 0's, cast.
    """
    values = []
    for index, state in enumerate(shard_states):
        if key not in state:
            raise ShardedSnapshotError(f"shard {index} lacks the step-wide optimizer state {key!r}")
        values.append(state[key])
    for index, value in enumerate(values):
        seen = next(i for i, v in enumerate(values) if v.dtype == value.dtype)
        if not _same(value, values[seen]):
            raise ShardedSnapshotError(
                f"the step-wide optimizer state {key!r} differs between shards: shard {seen} "
                f"has {_show(values[seen])}, shard {index} has {_show(value)} "
                "(every shard of a job takes every step: these files are not one cut)"
            )
    chosen = next((v for v in values if v.dtype == slot.dtype), values[0])
    return chosen if chosen.dtype == slot.dtype else chosen.astype(slot.dtype)


def split_model(state: SnapshotState, layout: Layout) -> list[SnapshotState]:
    """Each shard's part of a whole model (:func:`merge_shards`) for ``layout``.

    A shard holds its variables (a split one's rows), their slots (the same rows of a
    split one's) and the step-wide state; every shard gets the whole aggregation state.
    Each part is checked as a server checks a snapshot it loads.
    """
    model = state.model
    by_name = layout.by_name()
    if set(by_name) != set(model.variables):
        raise ShardedSnapshotError("the layout does not place exactly the model's variables")
    parts = []
    for shard in range(layout.shards):
        variables: dict[str, np.ndarray] = {}
        pieces: dict[str, Piece] = {}
        for placement, piece in layout.shard_variables(shard):
            array = model.variables[placement.name]
            variables[placement.name] = (
                np.ascontiguousarray(array[piece.start : piece.stop]) if placement.split else array
            )
            pieces[placement.name] = piece
        optimizer_state: dict[str, np.ndarray] = {}
        for key, (owner, slot) in _state_specs(_built(model.optimizer, variables)).items():
            value = model.optimizer_state[key]
            if owner is None:
                value = value if value.dtype == slot.dtype else value.astype(slot.dtype)
            elif by_name[owner].split:
                piece = pieces[owner]
                if value.ndim == 0 or value.shape[0] != by_name[owner].shape[0]:
                    raise ShardedSnapshotError(
                        f"optimizer state {key!r} of {owner!r} has shape {list(value.shape)}, "
                        f"not the variable's {by_name[owner].shape[0]} rows: the variable "
                        "cannot be split"
                    )
                value = np.ascontiguousarray(value[piece.start : piece.stop])
            if value.shape != slot.shape or value.dtype != slot.dtype:
                raise ShardedSnapshotError(
                    f"shard {shard}'s optimizer state {key!r} would be {value.dtype.name} "
                    f"{list(value.shape)}, its optimizer keeps it as {slot.dtype.name} "
                    f"{list(slot.shape)}"
                )
            optimizer_state[key] = value
        part = ModelState(
            model_name=model.model_name,
            optimizer=model.optimizer,
            variables=variables,
            optimizer_state=optimizer_state,
            version=model.version,
        )
        try:
            check_model_state(part, f"shard {shard}")
        except ParamServeError as exc:
            raise ShardedSnapshotError(str(exc)) from None
        parts.append(
            SnapshotState(model=part, aggregation=state.aggregation, created_at=state.created_at)
        )
    return parts


# --- writing -------------------------------------------------------------------------------
def _check_out(out_dir: Path) -> None:
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise ShardedSnapshotError(
                f"{out_dir} exists and is not empty: give a new directory for the snapshot"
            )
    elif out_dir.exists():
        raise ShardedSnapshotError(f"{out_dir} exists and is not a directory")


def write_sharded_snapshot(
    out_dir: str | os.PathLike[str],
    states: Sequence[SnapshotState],
    *,
    layout: Layout,
    cut_id: str,
    split_threshold_bytes: int,
    created_at: str | None = None,
) -> dict[str, Any]:
    """Write a sharded snapshot directory (``states[i]``: shard i's) atomically; returns
    the manifest.

    The files and the manifest are written in a temporary folder next to ``out_dir`` and
    renamed to it at the end: ``out_dir`` either does not exist or is the whole snapshot.
    ShardedSnapshotError when ``out_dir`` exists and is not empty.
    """
    out_dir = Path(out_dir)
    if len(states) != layout.shards:
        raise ValueError(f"{len(states)} shard states for a layout of {layout.shards} shards")
    version = states[0].model.version
    _check_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = checkpoint_dir.make_private_dir(out_dir.parent, f"sharded-{out_dir.name}")
    try:
        files = []
        for shard, state in enumerate(states):
            path = temp / shard_file_name(shard)
            # Each file names its cut, so that a job it is uploaded to offers it as one.
            cut = {"cut_id": cut_id, "shard_index": shard, "shards": layout.shards}
            info = write_snapshot_file(path, dataclasses.replace(state, cut=cut))
            files.append(
                {
                    "shard": shard,
                    "file": path.name,
                    "snapshot_id": info.id,
                    "sha256": file_sha256(path),
                    "size_bytes": info.size_bytes,
                }
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cut_id": cut_id,
            "version": version,
            "shards": layout.shards,
            "partitioner_version": PARTITIONER_VERSION,
            "split_threshold_bytes": split_threshold_bytes,
            "layout": layout.to_json(),
            "created_at": created_at or utc_now(),
            "files": files,
        }
        with checkpoint_dir.open_private(temp / MANIFEST) as f:
            f.write((json.dumps(manifest, indent=2) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        checkpoint_dir.fsync_dir(temp)
        _check_out(out_dir)
        try:
            # rename(2) replaces an empty directory, and refuses a non-empty one.
            os.replace(temp, out_dir)
        except OSError as exc:
            raise ShardedSnapshotError(f"cannot create {out_dir}: {exc.strerror}") from None
        checkpoint_dir.fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return manifest


def _check_target(shards: int, split_threshold_bytes: int | None) -> None:
    """ShardedSnapshotError unless ``shards`` and ``split_threshold_bytes`` can place a job."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ShardedSnapshotError(f"--shards must be an integer >= 1; got {shards!r}")
    if split_threshold_bytes is not None and split_threshold_bytes < 1:
        raise ShardedSnapshotError(
            f"--split-threshold-bytes must be >= 1; got {split_threshold_bytes}"
        )


def resharded_parts(
    snapshot: ShardedSnapshot, shards: int, *, split_threshold_bytes: int | None = None
) -> tuple[Layout, list[SnapshotState], int]:
    """``snapshot`` placed on ``shards`` shards: ``(layout, each shard's state, the split
    threshold used)``, as a job of that many shards created afresh would hold the model.

    ``split_threshold_bytes``: the variables to split by rows (default: the manifest's).
    ShardedSnapshotError for a model that cannot fill ``shards`` shards or an optimizer
    option a sharded job refuses.
    """
    _check_target(shards, split_threshold_bytes)
    threshold = split_threshold_bytes or int(snapshot.manifest["split_threshold_bytes"])
    whole = merge_shards(snapshot)
    model = whole.model
    optimizer = make_optimizer(model.optimizer)
    refused = optimizer.cross_variable_options()
    if shards > 1 and refused:
        raise ShardedSnapshotError(
            f"{'; '.join(refused)}: this option reads every variable at once, which a job of "
            f"{shards} shards cannot do shard by shard"
        )
    try:
        layout = partition(
            {n: (a.dtype.name, a.shape) for n, a in model.variables.items()},
            shards,
            split_threshold_bytes=threshold,
            split_rows=optimizer.splits_rows(),
        )
    except ValueError as exc:
        raise ShardedSnapshotError(str(exc)) from None
    parts = split_model(
        SnapshotState(model=model, aggregation=whole.aggregation, created_at=utc_now()), layout
    )
    return layout, parts, threshold


def reshard(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    shards: int,
    *,
    split_threshold_bytes: int | None = None,
) -> dict[str, Any]:
    """Re-shard the sharded snapshot ``in_dir`` for a job of ``shards`` shards into the new
    directory ``out_dir``; returns its manifest (a new ``cut_id``, the same version).

    ``split_threshold_bytes``: the variables to split by rows (default: the manifest's, the
    threshold the job was created with). ShardedSnapshotError for a snapshot that cannot be
    read (see :func:`load_sharded_snapshot`), a model that cannot fill ``shards`` shards, an
    optimizer option a sharded job refuses, or an ``out_dir`` that exists and is not empty.
    """
    _check_target(shards, split_threshold_bytes)
    _check_out(Path(out_dir))  # before the work, and again before the rename
    snapshot = load_sharded_snapshot(in_dir)
    layout, parts, threshold = resharded_parts(
        snapshot, shards, split_threshold_bytes=split_threshold_bytes
    )
    del snapshot
    return write_sharded_snapshot(
        out_dir,
        parts,
        layout=layout,
        cut_id=f"reshard-{uuid.uuid4().hex}",
        split_threshold_bytes=threshold,
        created_at=parts[0].created_at,
    )


def reshard_upload(
    chunks: Iterable[bytes],
    *,
    size_bytes: int,
    manifest: bytes,
    shards: int,
    shard_index: int,
    cut_id: str,
    split_threshold_bytes: int | None,
    work_dir: Path,
) -> SnapshotState:
    """Shard ``shard_index``'s part, for a job of ``shards`` shards, of a sharded snapshot
    uploaded whole: ``chunks`` are its files end to end in the manifest's order.

    The files are written to a private folder in ``work_dir`` (removed again), checked as
    :func:`load_sharded_snapshot` checks a directory and re-placed as :func:`reshard` does;
    the part returned is marked as shard ``shard_index`` of the cut ``cut_id``.
    ShardedSnapshotError for anything wrong with the upload.
    """
    if not 0 <= shard_index < shards:
        raise ShardedSnapshotError(f"shard_index {shard_index} is not in [0, {shards})")
    if not cut_id:
        raise ShardedSnapshotError("a re-sharded upload needs the new cut's id")
    temp = checkpoint_dir.make_private_dir(work_dir, "reshard-upload")
    try:
        with checkpoint_dir.open_private(temp / MANIFEST) as f:
            f.write(manifest)
        listed = read_manifest(temp)
        sizes = [int(entry["size_bytes"]) for entry in listed["files"]]
        if sum(sizes) != size_bytes:
            raise ShardedSnapshotError(
                f"the manifest's files hold {sum(sizes)} bytes and the upload declares "
                f"{size_bytes}: send every file of the snapshot, in shard order"
            )
        _write_split(chunks, [temp / e["file"] for e in listed["files"]], sizes)
        snapshot = load_sharded_snapshot(temp)
        _, parts, _ = resharded_parts(
            snapshot, shards, split_threshold_bytes=split_threshold_bytes
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    cut = {"cut_id": cut_id, "shard_index": shard_index, "shards": shards}
    return dataclasses.replace(parts[shard_index], cut=cut)


def _write_split(chunks: Iterable[bytes], paths: Sequence[Path], sizes: Sequence[int]) -> None:
    """Write the stream ``chunks`` into ``paths``, ``sizes[i]`` bytes into ``paths[i]``."""
    index, left = 0, sizes[0] if sizes else 0
    files = [checkpoint_dir.open_private(p) for p in paths]
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                while left == 0:
                    index += 1
                    if index >= len(sizes):
                        raise ShardedSnapshotError("the upload holds more bytes than its files")
                    left = sizes[index]
                take = min(left, len(view))
                files[index].write(view[:take])
                view, left = view[take:], left - take
    finally:
        for f in files:
            f.close()
