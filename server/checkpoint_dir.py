"""The checkpoint directory around the snapshot files: its lock, its record of the model it
serves, and the removal of what a crash left behind.

``.paramserve.lock``
    An exclusive ``flock`` the daemon holds for its whole life (the file holds the pid and
    host of the holder). A second daemon on the same directory refuses to start. Since nothing
    else writes into a locked directory, start-up removes every temporary name (``.tmp*``)
    whatever its age: they are all debris of an earlier run.

``serving-model.json``
    The identity of the model the daemon serves (model name, then variable names, dtypes
    and shapes in order: what a restore over a live model must match), or ``null`` once the
    model is deleted. Rewritten atomically before the model changes (create, delete,
    restore) and before a snapshot is written, so ``--resume`` only ever restores a snapshot
    of the model the directory was serving when the daemon stopped.

Every file the daemon writes here is 0600, and every temporary name starts with ``.tmp-``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ParamServeError, StartupRefused
from .model import Model, ModelState, specs_of

logger = logging.getLogger(__name__)

LOCK_NAME = ".paramserve.lock"
RECORD_NAME = "serving-model.json"
RECORD_FORMAT = "paramserve.serving_model"
RECORD_FORMAT_VERSION = 1
TEMP_PREFIX = ".tmp-"  # the daemon's own temporary names
LEFTOVER_PREFIX = ".tmp"  # ours, and the libraries' (safetensors: ``.tmpXXXXXX``)
FILE_MODE = 0o600
DIR_MODE = 0o700
_SHOWN_VARIABLES = 8  # variables named in a message; the rest are counted


class CheckpointDirError(ParamServeError):
    """The checkpoint directory cannot be written: the change was not made."""


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the identity of a model --------------------------------------------------------------
@dataclass(frozen=True)
class ModelIdentity:
    """A model definition as restores compare them: the name, then variables in order."""

    name: str
    variables: tuple[tuple[str, str, tuple[int, ...]], ...]

    @classmethod
    def of_model(cls, model: Model) -> ModelIdentity:
        return cls(model.name, tuple((s.name, s.dtype, s.shape) for s in specs_of(model)))

    @classmethod
    def of_state(cls, state: ModelState) -> ModelIdentity:
        variables = state.variables.items()
        return cls(
            state.model_name,
            tuple((n, a.dtype.name, tuple(int(d) for d in a.shape)) for n, a in variables),
        )

    @classmethod
    def of_entries(cls, name: str, entries: Iterable[Mapping[str, Any]]) -> ModelIdentity:
        """From a snapshot manifest's ``variables`` entries (name, dtype, shape)."""
        return cls(name, tuple((e["name"], e["dtype"], tuple(e["shape"])) for e in entries))

    def describe(self) -> str:
        """``model 'm' with variables ['w float32[8, 1]', 'b float32[1]']``."""
        shown = [f"{n} {d}{list(s)}" for n, d, s in self.variables[:_SHOWN_VARIABLES]]
        more = len(self.variables) - len(shown)
        return f"model {self.name!r} with variables {shown}" + (f" and {more} more" if more else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "variables": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in self.variables],
        }

    @classmethod
    def from_json(cls, value: Any) -> ModelIdentity:
        """The identity in a record; ValueError when malformed."""
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise ValueError("'model' must be null or an object with a string 'name'")
        variables = value.get("variables")
        if not isinstance(variables, list):
            raise ValueError("'model.variables' must be a list")
        out = []
        for v in variables:
            ok = (
                isinstance(v, dict)
                and isinstance(v.get("name"), str)
                and isinstance(v.get("dtype"), str)
                and isinstance(v.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in v["shape"])
            )
            if not ok:
                raise ValueError(f"malformed variable in 'model.variables': {v!r:.200}")
            out.append((v["name"], v["dtype"], tuple(v["shape"])))
        return cls(value["name"], tuple(out))


# --- the record of the model the directory serves ----------------------------------------
@dataclass(frozen=True)
class ServingRecord:
    """What ``serving-model.json`` says: the model (None: deleted), when and why it changed."""

    model: ModelIdentity | None
    changed_at: str
    reason: str

    def describe(self) -> str:
        return self.model.describe() if self.model is not None else "no model (deleted)"


def record_path(directory: Path) -> Path:
    return Path(directory) / RECORD_NAME


def read_record(directory: Path) -> ServingRecord | None:
    """The directory's record; None without one; ValueError (naming the file) if unreadable."""
    path = record_path(directory)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from exc
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError(f"'format' must be {RECORD_FORMAT!r}")
        if data.get("format_version") != RECORD_FORMAT_VERSION:
            raise ValueError(
                f"format_version {data.get('format_version')!r} is not supported "
                f"(expected {RECORD_FORMAT_VERSION})"
            )
        model = data.get("model")
        return ServingRecord(
            model=None if model is None else ModelIdentity.from_json(model),
            changed_at=str(data.get("changed_at", "")),
            reason=str(data.get("reason", "")),
        )
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a valid record of the served model: {exc}") from exc


def write_record(directory: Path, record: ServingRecord) -> None:
    """Replace the record atomically (0600 temp file, fsync, rename, fsync the directory)."""
    directory = Path(directory)
    data = {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "model": None if record.model is None else record.model.to_json(),
        "changed_at": record.changed_at,
        "reason": record.reason,
    }
    temp = directory / f"{TEMP_PREFIX}record-{uuid.uuid4().hex}.json"
    try:
        with open_private(temp) as f:
            f.write((json.dumps(data, indent=1) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, record_path(directory))
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def open_private(path: Path) -> BinaryIO:
    """Create ``path`` (it must not exist) as a 0600 file, open for binary writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def make_private_dir(directory: Path, label: str) -> Path:
    """A new 0700 temporary folder ``.tmp-<label>-<random>`` in ``directory``."""
    path = Path(directory) / f"{TEMP_PREFIX}{label}-{uuid.uuid4().hex}"
    path.mkdir(mode=DIR_MODE)
    return path


# --- the lock and start-up cleanup ---------------------------------------------------------
class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/.paramserve.lock``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        path = self.directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise StartupRefused(
                f"cannot open the lock file {path} of the checkpoint directory: {exc}; the "
                f"daemon needs to write in {self.directory} (check its owner and permissions)"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StartupRefused(
                f"the checkpoint directory {self.directory} is in use by another paramserve "
                f"daemon ({holder}; it holds the lock on {path}). Two daemons must never share "
                "one checkpoint directory: stop the other daemon first, or give this one its "
                "own --checkpoint-dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StartupRefused(
                f"cannot lock the checkpoint directory {self.directory} ({path}): {exc}. The "
                "daemon needs flock() there to be sure no other daemon writes into it; use a "
                "local file system (or NFSv4) for --checkpoint-dir"
            ) from exc
        with contextlib.suppress(OSError):  # only informs a refused second daemon
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (closing the file); safe to call twice. The file stays: deleting a lock
        file that another process may be opening would let two daemons in."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 200, 0).decode().strip()
        if text:
            return text
    return "holder unknown"


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete every temporary name (``.tmp*``: files and folders) an earlier run left.

    Only safe under the directory's lock: a daemon writing right now would lose its file.
    """
    removed = []
    for path in sorted(Path(directory).iterdir()):
        if not path.name.startswith(LEFTOVER_PREFIX):
            continue
        try:
            size = _size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            logger.warning(
                "cannot remove leftover temporary %s: %s",
                path,
                exc,
                extra={"event": "leftover_not_removed", "path": str(path)},
            )
            continue
        removed.append(path)
        logger.info(
            "removed leftover temporary %s (%d bytes) of an earlier run",
            path,
            size,
            extra={"event": "leftover_removed", "path": str(path), "size_bytes": size},
        )
    if removed:
        fsync_dir(Path(directory))
    return removed


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
