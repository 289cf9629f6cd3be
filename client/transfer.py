"""Snapshot files over the wire: chunked upload and download, with tqdm bars on big ones."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from .errors import DataLossError

# Smaller transfers finish before a bar would be worth reading.
PROGRESS_MIN_BYTES = 32 << 20


def progress_bar(total_bytes: int, description: str, progress: bool | None) -> Any:
    """A byte-counting tqdm bar on stderr, disabled unless wanted.

    ``progress=None`` (auto) shows it only for transfers over 32 MiB on a terminal.
    """
    from tqdm import tqdm  # only transfers show a bar

    if progress is None:
        progress = total_bytes > PROGRESS_MIN_BYTES and sys.stderr.isatty()
    return tqdm(
        total=total_bytes,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )


def upload_requests(
    path: Path | Sequence[Path],
    *,
    restore: bool,
    chunk_bytes: int,
    bar: Any,
    reshard: pb.ReshardUpload | None = None,
) -> Iterator[pb.UploadSnapshotRequest]:
    """The header, then the file (or the files end to end) in ``chunk_bytes`` pieces, read
    lazily as gRPC sends."""
    paths = [path] if isinstance(path, Path) else list(path)
    sizes = [p.stat().st_size for p in paths]
    size = sum(sizes)
    header = pb.UploadSnapshotHeader(size_bytes=size, restore=restore)
    if reshard is not None:
        header.reshard.CopyFrom(reshard)
    yield pb.UploadSnapshotRequest(header=header)
    offset = 0
    for file, expected in zip(paths, sizes, strict=True):
        start = offset
        with file.open("rb") as f:
            while piece := f.read(chunk_bytes):
                request = pb.UploadSnapshotRequest()
                request.chunk.offset = offset
                request.chunk.data = piece
                if offset == 0:
                    request.chunk.total_size = size
                yield request
                offset += len(piece)
                bar.update(len(piece))
        if offset - start != expected:
            raise DataLossError(
                f"{file} changed while it was uploaded: {offset - start} of {expected} bytes"
            )
    yield pb.UploadSnapshotRequest(end=tpb.StreamEnd())


def write_download(
    chunks: Iterable[pb.FileChunk], path: Path, *, description: str, progress: bool | None
) -> int:
    """Write a downloaded file atomically (temporary file, then rename); returns its size.

    Offsets must be contiguous and the total must match the size the server announced,
    otherwise :class:`DataLossError` and nothing is left at ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    received = 0
    total: int | None = None
    bar: Any = None
    try:
        with partial.open("wb") as f:
            for chunk in chunks:
                if total is None:
                    total = chunk.total_size
                    bar = progress_bar(total, description, progress)
                if chunk.offset != received:
                    raise DataLossError(
                        f"download chunk at offset {chunk.offset}, expected {received}"
                    )
                data = chunk.data
                f.write(data)
                received += len(data)
                bar.update(len(data))
            f.flush()
            os.fsync(f.fileno())
        if received != (total or 0):
            raise DataLossError(f"download ended after {received} of {total or 0} bytes")
        os.replace(partial, path)
    finally:
        if bar is not None:
            bar.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return received
