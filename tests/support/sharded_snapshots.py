"""Sharded snapshot directories for tests: one cut of an idle sharded job, written as
``paramserve snapshot reshard`` reads it (``manifest.json`` and ``shard-i.safetensors``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from paramserve.client.sharded import ShardedClient
from paramserve.server.reshard import FORMAT, FORMAT_VERSION, MANIFEST, file_sha256
from paramserve.server.snapshots import utc_now
from paramserve.wire.partition import PARTITIONER_VERSION


def take_sharded_snapshot(client: ShardedClient, directory: Path) -> dict[str, Any]:
    """Snapshot every shard of ``client``'s job (idle: every shard at one version), download
    each file into the new ``directory`` and write the manifest; returns the manifest."""
    infos = [shard.snapshot() for shard in client.shards]
    versions = [info.version for info in infos]
    assert len(set(versions)) == 1, f"the shards are at versions {versions}: not idle"
    directory.mkdir(parents=True)
    files = []
    for index, (shard, info) in enumerate(zip(client.shards, infos, strict=True)):
        path = shard.download_snapshot(info, directory / f"shard-{index}.safetensors")
        files.append(
            {
                "shard": index,
                "file": path.name,
                "snapshot_id": info.id,
                "sha256": "",
                "size_bytes": 0,
            }
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cut_id": f"test-{uuid.uuid4().hex}",
        "version": versions[0],
        "shards": len(client.shards),
        "partitioner_version": PARTITIONER_VERSION,
        "split_threshold_bytes": client.split_threshold_bytes,
        "layout": client.describe().layout.to_json(),  # type: ignore[union-attr]
        "created_at": utc_now(),
        "files": files,
    }
    return rewrite_manifest(directory, manifest)


def rewrite_manifest(directory: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``manifest`` (default: the directory's own) with every file's sha256 and size as
    the files are now; returns it."""
    path = directory / MANIFEST
    manifest = json.loads(path.read_text()) if manifest is None else manifest
    for entry in manifest["files"]:
        file = directory / entry["file"]
        entry["sha256"] = file_sha256(file)
        entry["size_bytes"] = file.stat().st_size
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
