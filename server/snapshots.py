"""Snapshots on disk: one safetensors file each, written atomically, checked fully on load.

A file holds tensors ``variables/<name>`` and ``optimizer/<state key>`` plus safetensors
metadata ``{"format", "format_version", "manifest"}``; the manifest (JSON) carries the
model name, optimizer config, version, aggregation state, creation time, tensor order,
dtypes and a sha256 per tensor. Nothing is ever pickled. Loading checks every byte and
that the optimizer state fits an optimizer rebuilt from the config before returning.

The directory around the files (its lock, its record of the model it serves, start-up
cleanup) is :mod:`.checkpoint_dir`'s; a daemon opens its store with ``exclusive=True``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from paramserve.optim_core import Variable

from . import checkpoint_dir
from .aggregation import check_aggregation_state
from .checkpoint_dir import (
    FILE_MODE,
    TEMP_PREFIX,
    CheckpointDirError,
    ModelIdentity,
    ServingRecord,
)
from .errors import InvalidArgument, NotFound, StartupRefused
from .limits import Limits
from .model import ModelState, check_variables, make_optimizer

logger = logging.getLogger(__name__)

FORMAT = "paramserve.snapshot"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
_ID_RE = re.compile(r"snap-(\d{12,})-(\d{8}T\d{12})Z")
_ID_TIME = "%Y%m%dT%H%M%S%f"
# Stored dtypes safetensors.numpy reads back; bfloat16 travels as a uint16 view.
_STORABLE = {
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
}  # fmt: skip
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_NO_LIMITS = Limits(
    max_variables=sys.maxsize, max_tensor_bytes=sys.maxsize, max_state_bytes=sys.maxsize
)


def utc_now() -> str:
    """The current time as RFC 3339 UTC with microseconds (``...T12:00:00.000000Z``)."""
    return _rfc3339(datetime.now(timezone.utc))


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: Any) -> datetime:
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is not None:
                return moment.astimezone(timezone.utc)
    raise InvalidArgument(f"created_at must be an RFC 3339 UTC time; got {text!r}")


@dataclass
class SnapshotState:
    """Everything a restore replaces: the model and the aggregation (dedupe) state."""

    model: ModelState
    aggregation: dict[str, Any]
    created_at: str = field(default_factory=utc_now)
    # One shard's part of a sharded job's snapshot: {"cut_id", "shard_index", "shards"}.
    cut: dict[str, Any] | None = None


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    version: int
    size_bytes: int
    created_at: str
    path: Path
    cut: dict[str, Any] | None = None  # see SnapshotState.cut


def _check_cut(cut: Any, label: str) -> dict[str, Any] | None:
    """A manifest's cut (None when absent); InvalidArgument when malformed."""
    if cut is None:
        return None
    ok = (
        isinstance(cut, dict)
        and set(cut) == {"cut_id", "shard_index", "shards"}
        and isinstance(cut["cut_id"], str)
        and 0 < len(cut["cut_id"]) <= 128
        and all(
            isinstance(cut[k], int) and not isinstance(cut[k], bool)
            for k in ("shard_index", "shards")
        )
        and 0 <= cut["shard_index"] < cut["shards"]
    )
    if not ok:
        raise InvalidArgument(f"{label}: malformed manifest cut: {cut!r:.200}")
    return dict(cut)


def _cut_of_file(path: Path) -> dict[str, Any] | None:
    """The cut recorded in a snapshot file's manifest (None: none, or unreadable)."""
    try:
        header = json.loads(_header_bytes(path))
        manifest = json.loads(header["__metadata__"]["manifest"])
        return _check_cut(manifest.get("cut"), path.name)
    except (OSError, ValueError, KeyError, TypeError, InvalidArgument):
        return None


def _stored(array: np.ndarray) -> tuple[np.ndarray, str]:
    """The little-endian, C-contiguous array to write, and the dtype name to record."""
    array = np.asarray(array)
    name = array.dtype.name
    if array.dtype == _BFLOAT16:
        array = array.view(np.uint16)
    elif name not in _STORABLE:
        raise InvalidArgument(f"dtype {name} cannot be stored in a snapshot")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return (array if array.flags.c_contiguous else array.copy(order="C")), name


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()


_fsync_dir = checkpoint_dir.fsync_dir


def _header_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(min(size, 100 << 20))


def _entries(manifest: dict[str, Any], section: str, label: str) -> list[dict[str, Any]]:
    entries = manifest.get(section)
    if not isinstance(entries, list):
        raise InvalidArgument(f"{label}: manifest {section!r} must be a list")
    for entry in entries:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("tensor"), str)
            and entry.get("dtype") in _STORABLE | {"bfloat16"}
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("sha256"), str)
        )
        if not ok:
            raise InvalidArgument(
                f"{label}: malformed manifest entry in {section!r}: {entry!r:.200}"
            )
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{label}: manifest {section!r} repeats a name")
    return entries


def _manifest(metadata: dict[str, str], label: str) -> dict[str, Any]:
    """The manifest of a file's safetensors metadata, after the format checks."""
    if metadata.get("format") != FORMAT:
        raise InvalidArgument(
            f"{label}: not a paramserve snapshot (format {metadata.get('format')!r})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InvalidArgument(
            f"{label}: format_version {metadata.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION!r})"
        )
    try:
        manifest = json.loads(metadata.get("manifest", ""))
    except ValueError as exc:
        raise InvalidArgument(f"{label}: the manifest is not valid JSON") from exc
    if not isinstance(manifest, dict):
        raise InvalidArgument(f"{label}: the manifest must be a JSON object")
    return manifest


def _newest(identified: list[tuple[SnapshotInfo, ModelIdentity]], model: ModelIdentity) -> str:
    """The id of the newest snapshot of ``model`` (``identified`` is newest first)."""
    return next(info.id for info, identity in identified if identity == model)


def _read_tensors(
    handle: Any, entries: list[dict[str, Any]], prefix: str, label: str
) -> dict[str, np.ndarray]:
    out = {}
    for entry in entries:
        name, key = entry["name"], entry["tensor"]
        if key != prefix + name:
            raise InvalidArgument(f"{label}: tensor {key!r} should be named {prefix + name!r}")
        try:
            array = handle.get_tensor(key)
        except Exception as exc:  # SafetensorError, or a dtype safetensors.numpy cannot read
            raise InvalidArgument(f"{label}: tensor {key!r} cannot be read: {exc}") from exc
        want_dtype = "uint16" if entry["dtype"] == "bfloat16" else entry["dtype"]
        if array.dtype.name != want_dtype or list(array.shape) != entry["shape"]:
            raise InvalidArgument(
                f"{label}: tensor {key!r} is {array.dtype.name} {list(array.shape)} in the file, "
                f"the manifest says {want_dtype} {entry['shape']}"
            )
        if _sha256(array) != entry["sha256"]:
            raise InvalidArgument(f"{label}: tensor {key!r} fails its sha256 check (corrupt file)")
        out[name] = array.view(_BFLOAT16) if entry["dtype"] == "bfloat16" else array
    return out


def check_model_state(model: ModelState, label: str) -> None:
    """Rebuild the optimizer on the variables in a scratch copy and load the state into it."""
    try:
        # Names and dtypes as create_model checks them; size limits are the restoring store's.
        check_variables(model.variables, _NO_LIMITS)
        optimizer = make_optimizer(model.optimizer)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{label}: {exc}") from exc
    try:
        optimizer.build([Variable(a, path=n) for n, a in model.variables.items()])
        optimizer.load_state_dict(model.optimizer_state)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"{label}: the optimizer state does not match the optimizer config: {exc}"
        ) from exc
    slots = optimizer.variables
    arrays = list(model.optimizer_state.values())
    for key, array, slot in zip(model.optimizer_state, arrays, slots, strict=False):
        if array.dtype != slot.dtype:
            raise InvalidArgument(
                f"{label}: optimizer state {key!r} is {array.dtype.name}, the optimizer "
                f"keeps it as {slot.dtype.name}"
            )
    if optimizer.iterations != model.version:
        raise InvalidArgument(
            f"{label}: the manifest says version {model.version}, the optimizer state has "
            f"{optimizer.iterations} iterations"
        )


def _invalid_snapshot(
    read: Callable[[Path, str], SnapshotState],
) -> Callable[[Path, str], SnapshotState]:
    """``read`` whose InvalidArgument errors (a defective file) say SNAPSHOT_INVALID."""

    @functools.wraps(read)
    def checked(path: Path, label: str) -> SnapshotState:
        try:
            return read(path, label)
        except InvalidArgument as exc:
            if exc.reason == InvalidArgument.reason:
                exc.add_details(reason="SNAPSHOT_INVALID")
            exc.violations.clear()  # the file is at fault, not a field of the request
            stored = path.name.endswith(SUFFIX) and _ID_RE.fullmatch(path.name[: -len(SUFFIX)])
            if stored:
                exc.add_details(metadata={"snapshot_id": path.name[: -len(SUFFIX)]})
            raise

    return checked


@dataclass(frozen=True)
class Upload:
    """An uploaded snapshot, stored and validated: see :meth:`SnapshotStore.importing`."""

    info: SnapshotInfo
    state: SnapshotState
    added: bool  # False: an identical file was already there (the upload was deduplicated)


class SnapshotStore:
    """A directory of snapshot files: save, list, load, import, and retention.

    ``exclusive=True`` (the daemon) locks the directory for the store's life (a second
    exclusive store refuses with :class:`StartupRefused`), removes every leftover temporary
    name of an earlier run, and enables the record of the served model (:meth:`record_model`,
    :meth:`resume_candidate`). Without it (tools, tests) nothing is locked or removed.
    """

    def __init__(
        self, directory: Path, *, keep_last: int | None = None, exclusive: bool = False
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"`keep_last` must be >= 1 or None. Received: {keep_last!r}")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if not exclusive:
                raise
            # The daemon's --checkpoint-dir: say which setting is wrong, not just errno.
            why = "it is not a directory" if self.directory.exists() else exc.strerror
            raise StartupRefused(
                f"cannot use {self.directory} as the checkpoint directory: {why}; give "
                "--checkpoint-dir a directory the daemon may create and write in"
            ) from None
        self.keep_last = keep_last
        self._lock = threading.Lock()
        self._record_lock = threading.Lock()  # a leaf: taken under the model store's lock
        self._pending: set[str] = set()  # uploads stored, but whose restore is undecided
        self._dir_lock: checkpoint_dir.DirectoryLock | None = None
        if exclusive:
            self._dir_lock = checkpoint_dir.DirectoryLock(self.directory)
            try:
                checkpoint_dir.remove_leftovers(self.directory)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Release the directory's lock (exclusive stores); safe to call twice."""
        if self._dir_lock is not None:
            self._dir_lock.release()

    # --- naming --------------------------------------------------------------------------
    def path(self, snapshot_id: str) -> Path:
        """The file of ``snapshot_id``; InvalidArgument for a malformed id, NotFound if absent."""
        if not isinstance(snapshot_id, str) or not _ID_RE.fullmatch(snapshot_id):
            raise InvalidArgument(
                f"snapshot id {str(snapshot_id)[:80]!r} is not of the form "
                "snap-<12-digit version>-<yyyymmddThhmmssffffff>Z",
                violations=[("id", "must be snap-<12-digit version>-<yyyymmddThhmmssffffff>Z")],
            )
        path = self.directory / (snapshot_id + SUFFIX)
        if not path.is_file():
            raise NotFound(
                f"snapshot {snapshot_id!r} does not exist",
                reason="SNAPSHOT_NOT_FOUND",
                metadata={"snapshot_id": snapshot_id},
            )
        return path

    def _new_id(self, version: int, created: datetime) -> str:
        while True:
            snapshot_id = f"snap-{version:012d}-{created.strftime(_ID_TIME)}Z"
            if not (self.directory / (snapshot_id + SUFFIX)).exists():
                return snapshot_id
            created += timedelta(microseconds=1)

    @staticmethod
    def _info(path: Path) -> SnapshotInfo | None:
        match = _ID_RE.fullmatch(path.name[: -len(SUFFIX)]) if path.name.endswith(SUFFIX) else None
        if match is None:
            return None
        try:
            size = path.stat().st_size
            moment = datetime.strptime(match.group(2), _ID_TIME).replace(tzinfo=timezone.utc)
        except (OSError, ValueError):
            return None
        return SnapshotInfo(
            path.name[: -len(SUFFIX)],
            int(match.group(1)),
            size,
            _rfc3339(moment),
            path,
            _cut_of_file(path),
        )

    def list(self) -> list[SnapshotInfo]:
        """Every snapshot file, oldest first; temporary and foreign files are ignored."""
        infos = [i for p in self.directory.iterdir() if (i := self._info(p)) is not None]
        return sorted(infos, key=lambda i: (i.created_at, i.version, i.id))

    # --- the record of the served model ----------------------------------------------------
    def serving(self) -> ServingRecord | None:
        """The directory's record of the model it serves (None without one: a new directory,
        or one written before records existed); ValueError if it cannot be read."""
        return checkpoint_dir.read_record(self.directory)

    def record_model(self, model: ModelIdentity | None, *, reason: str) -> None:
        """Record that the directory now serves ``model`` (None: no model), atomically.

        Called before the change it records; a no-op when the record already says so. On
        failure raises :class:`CheckpointDirError` (the caller must not make the change).
        """
        with self._record_lock:
            try:
                current = self.serving()
            except ValueError as exc:  # the running daemon knows better: overwrite it
                logger.warning("replacing the record of the served model: %s", exc)
                current = None
            if current is not None and current.model == model:
                return
            record = ServingRecord(model=model, changed_at=utc_now(), reason=reason)
            try:
                checkpoint_dir.write_record(self.directory, record)
            except OSError as exc:
                path = checkpoint_dir.record_path(self.directory)
                logger.error(
                    "cannot record the served model in %s: %s",
                    path,
                    exc,
                    extra={"event": "record_failed", "path": str(path)},
                )
                raise CheckpointDirError(
                    f"cannot record the model this server serves in {path} ({exc}), so "
                    f"nothing was changed (reason: {reason}): without that record a restart "
                    f"with --resume could load another model. Make {self.directory} writable "
                    "(free space, permissions) and retry"
                ) from exc
        logger.info(
            "checkpoint directory now serves %s (%s)",
            record.describe(),
            reason,
            extra={"event": "serving_model_recorded", "reason": reason},
        )

    def _identity_or_none(self, info: SnapshotInfo) -> ModelIdentity | None:
        try:
            return self.identity(info)
        except (InvalidArgument, NotFound):
            return None

    def identity(self, info: SnapshotInfo) -> ModelIdentity:
        """The model a snapshot holds, from its header only (cheap; not a full check)."""
        label = f"snapshot {info.id}"
        try:
            with safetensors.safe_open(info.path, framework="np") as handle:
                manifest = _manifest(handle.metadata() or {}, label)
        except safetensors.SafetensorError as exc:
            raise InvalidArgument(
                f"{label}: not a readable safetensors file (truncated or corrupt): {exc}"
            ) from exc
        except FileNotFoundError as exc:
            raise NotFound(f"{label} does not exist") from exc
        if not isinstance(manifest.get("model_name"), str):
            raise InvalidArgument(f"{label}: manifest model_name must be a string")
        return ModelIdentity.of_entries(
            manifest["model_name"], _entries(manifest, "variables", label)
        )

    # --- writing -------------------------------------------------------------------------
    def save(self, state: SnapshotState) -> SnapshotInfo:
        """Write ``state`` atomically (temp file, fsync, rename, fsync dir); apply retention.

        The file is written in a private temporary folder, so that safetensors' own
        temporary file lands there too, never loose in the directory.
        """
        model = state.model
        aggregation = check_aggregation_state(state.aggregation)
        created = _parse_time(state.created_at)
        tensors: dict[str, np.ndarray] = {}
        sections: dict[str, list[dict[str, Any]]] = {"variables": [], "optimizer_state": []}
        for section, prefix, arrays in (
            ("variables", "variables/", model.variables),
            ("optimizer_state", "optimizer/", model.optimizer_state),
        ):
            for name, array in arrays.items():
                stored, dtype = _stored(array)
                tensors[prefix + name] = stored
                sections[section].append(
                    {
                        "name": name,
                        "tensor": prefix + name,
                        "dtype": dtype,
                        "shape": list(stored.shape),
                        "sha256": _sha256(stored),
                    }
                )
        manifest = {
            "model_name": model.model_name,
            "optimizer": model.optimizer,
            "version": model.version,
            "aggregation": aggregation,
            "created_at": state.created_at,
            **sections,
        }
        if state.cut is not None:
            manifest["cut"] = _check_cut(state.cut, "the snapshot")
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "manifest": json.dumps(manifest),
        }
        with self._lock:
            snapshot_id = self._new_id(model.version, created)
            final = self.directory / (snapshot_id + SUFFIX)
            workdir = checkpoint_dir.make_private_dir(self.directory, snapshot_id)
            try:
                temp = workdir / (snapshot_id + SUFFIX)
                safetensors.numpy.save_file(tensors, temp, metadata=metadata)
                with open(temp, "rb+") as f:
                    os.fchmod(f.fileno(), FILE_MODE)
                    os.fsync(f.fileno())
                os.replace(temp, final)
                _fsync_dir(self.directory)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            info = self._info(final)
            assert info is not None
            self._retain(keep=snapshot_id)
        logger.info("saved snapshot %s (%d bytes)", snapshot_id, info.size_bytes)
        return info

    def import_file(self, chunks: Iterable[bytes], *, size_bytes: int) -> SnapshotInfo:
        """Store an uploaded snapshot file: write a temp file, validate it fully, rename."""
        with self.importing(chunks, size_bytes=size_bytes) as upload:
            return upload.info

    @contextlib.contextmanager
    def importing(self, chunks: Iterable[bytes], *, size_bytes: int) -> Iterator[Upload]:
        """Store an uploaded snapshot for the ``with`` body to use (restore it, say).

        The file is written under a 0600 temporary name, validated fully and renamed into
        place before the body runs. If the body raises, the file the upload added is removed
        again (one that was already there, identical, stays): the directory is as it was.
        Retention runs only once the body has succeeded.
        """
        upload = self._import(chunks, size_bytes)
        try:
            yield upload
        except BaseException:
            with self._lock:
                self._pending.discard(upload.info.id)
                if upload.added:
                    self._remove_refused(upload.info)
            raise
        with self._lock:
            self._pending.discard(upload.info.id)
            self._retain(keep=upload.info.id)

    def _remove_refused(self, info: SnapshotInfo) -> None:
        try:
            info.path.unlink()
            _fsync_dir(self.directory)
        except FileNotFoundError:
            return
        except OSError as exc:  # the refusal is what the caller must see, not this
            logger.warning("cannot remove uploaded snapshot %s: %s", info.id, exc)
            return
        logger.info("removed uploaded snapshot %s: its restore was refused", info.id)

    def _import(self, chunks: Iterable[bytes], size_bytes: int) -> Upload:
        temp = self.directory / f"{TEMP_PREFIX}upload-{uuid.uuid4().hex}{SUFFIX}"
        try:
            written = 0
            with checkpoint_dir.open_private(temp) as f:
                for chunk in chunks:
                    written += len(chunk)
                    if written > size_bytes:
                        raise InvalidArgument(
                            f"the upload sent more than the declared {size_bytes} bytes"
                        )
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if written != size_bytes:
                raise InvalidArgument(
                    f"the upload ended early: {written} of {size_bytes} bytes received"
                )
            state = self._read(temp, "uploaded snapshot")
            with self._lock:
                created = _parse_time(state.created_at)
                version = state.model.version
                same_id = f"snap-{version:012d}-{created.strftime(_ID_TIME)}Z"
                same = self.directory / (same_id + SUFFIX)
                added = not (same.is_file() and _header_bytes(same) == _header_bytes(temp))
                if added:
                    final = self.directory / (self._new_id(version, created) + SUFFIX)
                    os.replace(temp, final)
                    _fsync_dir(self.directory)
                else:
                    temp.unlink()  # the very same snapshot is already here
                    final = same
                info = self._info(final)
                assert info is not None
                if added:
                    self._pending.add(info.id)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        logger.info(
            "imported snapshot %s (%d bytes)%s",
            info.id,
            info.size_bytes,
            "" if added else ": identical to the one already stored",
        )
        return Upload(info=info, state=state, added=added)

    def _retain(self, *, keep: str) -> None:
        """Delete the oldest snapshots of ``keep``'s model beyond ``keep_last`` (never
        ``keep``, nor an upload whose restore is still undecided: it may be removed again).

        Retention counts one model at a time: snapshots of other models (uploads kept on
        purpose) and unreadable files are never deleted by it, so uploading snapshots of
        another model cannot push the served model's snapshots out.
        """
        if self.keep_last is None:
            return
        infos = [i for i in self.list() if i.id not in self._pending]
        kept = next((i for i in infos if i.id == keep), None)
        if kept is None:
            return
        model = self._identity_or_none(kept)
        infos = [i for i in infos if i.id == keep or self._identity_or_none(i) == model]
        excess = len(infos) - self.keep_last
        for info in infos:
            if excess <= 0:
                break
            if info.id == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                info.path.unlink()
                logger.info("retention: deleted snapshot %s", info.id)
            excess -= 1

    # --- reading -------------------------------------------------------------------------
    def load(self, snapshot_id: str) -> SnapshotState:
        """The validated snapshot; NotFound, or InvalidArgument for any defect."""
        return self._read(self.path(snapshot_id), f"snapshot {snapshot_id}")

    def latest_valid(self) -> SnapshotInfo | None:
        """The newest snapshot that loads cleanly, of any model, skipping corrupt ones."""
        for info in reversed(self.list()):
            try:
                self._read(info.path, f"snapshot {info.id}")
            except (InvalidArgument, NotFound) as exc:
                logger.warning("skipping snapshot %s: %s", info.id, exc)
                continue
            return info
        return None

    def resume_candidate(self) -> tuple[SnapshotInfo, SnapshotState] | None:
        """The snapshot ``--resume`` restores, loaded and checked; None: start empty.

        - The record names a model: the newest valid snapshot of that model. Snapshots of
          other models are skipped with a warning naming both; if there are some and none of
          the served model is valid, :class:`StartupRefused` (never switch models silently).
        - The record says the model was deleted: None (the deleted model stays deleted).
        - No record (a new directory, or one of a paramserve before records): the newest
          valid snapshot if they are all of one model; :class:`StartupRefused` if they hold
          several models, since nothing says which one was served.
        - An unreadable record: :class:`StartupRefused`.
        """
        record_file = checkpoint_dir.record_path(self.directory)
        try:
            record = self.serving()
        except ValueError as exc:
            raise StartupRefused(
                f"--resume: {exc}. It says which model {self.directory} serves; without it "
                f"the daemon cannot tell which snapshots to resume. Delete {record_file} to "
                "resume as for a directory without a record (the newest valid snapshot, if "
                "all snapshots hold one model), or start without --resume"
            ) from exc
        infos = list(reversed(self.list()))
        if record is not None and record.model is None:
            newest = f" (newest: {infos[0].id})" if infos else ""
            logger.info(
                "resume: the model was deleted (%s at %s); starting with no model. %d "
                "snapshot(s) in %s are not loaded%s: restore one with `paramserve restore <id>`",
                record_file.name,
                record.changed_at,
                len(infos),
                self.directory,
                newest,
                extra={"event": "resume_deleted_model"},
            )
            return None
        identified: list[tuple[SnapshotInfo, ModelIdentity]] = []
        for info in infos:
            try:
                identified.append((info, self.identity(info)))
            except (InvalidArgument, NotFound) as exc:
                logger.warning("skipping snapshot %s: %s", info.id, exc)
        if record is None:
            models = dict.fromkeys(identity for _, identity in identified)
            if len(models) > 1:
                raise StartupRefused(
                    f"--resume: {self.directory} has no {record_file.name} (it was written by "
                    "a paramserve that did not record the model it serves) and holds "
                    f"snapshots of {len(models)} models: "
                    + "; ".join(
                        f"{m.describe()} (newest: {_newest(identified, m)})" for m in models
                    )
                    + ". Refusing to guess which one to resume: move the snapshots of the "
                    "models you do not want out of the directory, or start without --resume "
                    "and restore one with `paramserve restore <id>`"
                )
            wanted = next(iter(models), None)
        else:
            wanted = record.model
        others: dict[ModelIdentity, str] = {}
        for info, identity in identified:
            if identity != wanted:
                others.setdefault(identity, info.id)
                logger.warning(
                    "skipping snapshot %s: it holds %s, but %s serves %s (%s)",
                    info.id,
                    identity.describe(),
                    self.directory,
                    wanted.describe() if wanted is not None else "no model",
                    record_file.name,
                    extra={"event": "resume_skipped_other_model", "snapshot_id": info.id},
                )
                continue
            try:
                state = self._read(info.path, f"snapshot {info.id}")
            except (InvalidArgument, NotFound) as exc:
                logger.warning("skipping snapshot %s: %s", info.id, exc)
                continue
            if record is None:
                logger.info(
                    "resume: %s has no %s (written by an older paramserve); its snapshots "
                    "all hold %s, so that is the model it serves",
                    self.directory,
                    record_file.name,
                    identity.describe(),
                    extra={"event": "resume_adopted_model"},
                )
            return info, state
        if others and record is not None and record.model is not None:
            raise StartupRefused(
                f"--resume: {self.directory} serves {record.model.describe()} (recorded in "
                f"{record_file} at {record.changed_at}, {record.reason}), but holds no valid "
                "snapshot of it, only snapshots of "
                + "; ".join(f"{m.describe()} (newest: {i})" for m, i in others.items())
                + ". Refusing to start with another model. To start the served model afresh, "
                "start without --resume; to resume another model, start without --resume "
                "and restore its snapshot with `paramserve restore <id>` (or delete "
                f"{record_file} and move the snapshots you do not want out of the directory)"
            )
        return None

    @staticmethod
    @_invalid_snapshot
    def _read(path: Path, label: str) -> SnapshotState:
        try:
            with safetensors.safe_open(path, framework="np") as handle:
                manifest = _manifest(handle.metadata() or {}, label)
                var_entries = _entries(manifest, "variables", label)
                opt_entries = _entries(manifest, "optimizer_state", label)
                listed = {e["tensor"] for e in var_entries + opt_entries}
                present = set(handle.keys())
                if listed != present or len(listed) != len(var_entries) + len(opt_entries):
                    raise InvalidArgument(
                        f"{label}: the file's tensors do not match its manifest (missing "
                        f"{sorted(listed - present)[:5]}, unlisted {sorted(present - listed)[:5]})"
                    )
                variables = _read_tensors(handle, var_entries, "variables/", label)
                optimizer_state = _read_tensors(handle, opt_entries, "optimizer/", label)
        except safetensors.SafetensorError as exc:
            raise InvalidArgument(
                f"{label}: not a readable safetensors file (truncated or corrupt): {exc}"
            ) from exc
        except FileNotFoundError as exc:
            raise NotFound(f"{label} does not exist", reason="SNAPSHOT_NOT_FOUND") from exc
        version = manifest.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidArgument(f"{label}: manifest version must be an integer >= 0")
        if not isinstance(manifest.get("model_name"), str):
            raise InvalidArgument(f"{label}: manifest model_name must be a string")
        if not isinstance(manifest.get("optimizer"), dict):
            raise InvalidArgument(f"{label}: manifest optimizer must be a config object")
        _parse_time(manifest.get("created_at"))
        try:
            aggregation = check_aggregation_state(manifest.get("aggregation"))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{label}: {exc}") from exc
        model = ModelState(
            model_name=manifest["model_name"],
            optimizer=manifest["optimizer"],
            variables=variables,
            optimizer_state=optimizer_state,
            version=version,
        )
        check_model_state(model, label)
        return SnapshotState(
            model=model,
            aggregation=aggregation,
            created_at=manifest["created_at"],
            cut=_check_cut(manifest.get("cut"), label),
        )


# --- one file anywhere (sharded snapshot directories: paramserve.server.reshard) ----------
def read_snapshot_file(path: str | os.PathLike[str], label: str | None = None) -> SnapshotState:
    """The snapshot in the file ``path``, wherever it is, checked fully as a store loads one:
    NotFound, or InvalidArgument (reason SNAPSHOT_INVALID) for any defect. ``label`` names
    the file in messages (default: ``snapshot file NAME``)."""
    path = Path(path)
    return SnapshotStore._read(path, label or f"snapshot file {path.name}")


def write_snapshot_file(path: str | os.PathLike[str], state: SnapshotState) -> SnapshotInfo:
    """Write ``state`` to the file ``path`` (replacing it) exactly as a store saves it, by
    way of a private scratch folder next to it; returns its info (``id``: the id a store
    gives it on upload, ``path``: ``path``)."""
    path = Path(path)
    scratch = checkpoint_dir.make_private_dir(path.parent, "write")
    try:
        info = SnapshotStore(scratch).save(state)
        os.replace(info.path, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return SnapshotInfo(info.id, info.version, info.size_bytes, info.created_at, path)
