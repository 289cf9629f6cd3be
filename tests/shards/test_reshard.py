"""``paramserve snapshot reshard``: a sharded snapshot re-sharded offline, restored into a job
of another size, trains on exactly as one server that never stopped.

Real servers on loopback ports, each with its own checkpoint directory. A job of 3 shards
trains, is snapshotted shard by shard into a sharded snapshot directory, re-sharded for 2
shards and restored there (``UploadSnapshot`` with restore, per shard); that job trains on,
is snapshotted, re-sharded for 4 and restored again. After each restore and at the end the
weights and every optimizer slot equal, bit for bit, those of one server that took the same
steps without stopping. Then the refusals: a changed, missing or truncated file, shards at
different versions or of different jobs, a manifest of another format, an existing OUT.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from paramserve import optim_core
from paramserve.client import Client
from paramserve.client.sharded import ShardedClient
from paramserve.optim_core import Variable
from paramserve.server import cli
from paramserve.server.aggregation import check_aggregation_state
from paramserve.server.model import ModelState
from paramserve.server.reshard import (
    MANIFEST,
    ShardedSnapshotError,
    load_sharded_snapshot,
    merge_aggregation,
    merge_shards,
    reshard,
    split_model,
    write_sharded_snapshot,
)
from paramserve.server.snapshots import SnapshotState, read_snapshot_file, write_snapshot_file
from paramserve.wire.partition import partition
from tests.support.servers import LocalServer, LocalServers
from tests.support.sharded_snapshots import rewrite_manifest, take_sharded_snapshot

SHAPES = {
    "embedding": (48, 8),
    "dense/kernel": (8, 6),
    "dense/bias": (6,),
    "out/kernel": (6, 3),
    "out/bias": (3,),
}
SPLIT_BYTES = 1024  # the embedding (1536 bytes) splits; nothing else does
STEPS = 3  # per job
SIZES = (3, 2, 4)  # the jobs, in order

# Element-wise rules (the embedding is split by rows, on every job), then rules that read
# whole variables (every variable whole; they move between shards).
SPLIT = [
    ("Adam", lambda: optim_core.Adam(0.01)),
    ("SGD-momentum", lambda: optim_core.SGD(0.05, momentum=0.9, nesterov=True)),
    (
        "Ftrl",
        lambda: optim_core.Ftrl(
            0.05, l1_regularization_strength=0.01, l2_regularization_strength=0.02
        ),
    ),
    ("Adagrad", lambda: optim_core.Adagrad(0.1)),
    ("Nadam", lambda: optim_core.Nadam(0.01)),  # step-wide state besides the step count
    ("RMSprop-centered", lambda: optim_core.RMSprop(0.01, momentum=0.5, centered=True)),
    # Accumulators mid-cycle at each cut (3 pushes per job, 2 per step), EMA slots.
    (
        "Adam-ema-accumulate",
        lambda: optim_core.Adam(0.01, use_ema=True, gradient_accumulation_steps=2),
    ),
]
WHOLE = [
    ("Adafactor", lambda: optim_core.Adafactor(0.1)),
    ("Lamb", lambda: optim_core.Lamb(0.01)),
    ("Muon", lambda: optim_core.Muon(0.01)),
]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Per mode: one server, and jobs of 3, 2 and 4 shards (async: 3 and 2), each server with
    its own checkpoint directory."""
    root = tmp_path_factory.mktemp("reshard-servers")
    servers = LocalServers({"checkpoint_dir": lambda i: root / f"ckpt-{i}"})
    try:
        found: dict[str, Any] = {}
        for mode, sizes in (("sync", SIZES), ("async", (3, 2))):
            one = servers.start(mode=mode)
            sharded = {
                n: [servers.start(mode=mode, shards=n, shard_index=i) for i in range(n)]
                for n in sizes
            }
            found[mode] = (one, sharded)
        yield found
    finally:
        servers.stop_all()


def _initial(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _gradients(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(1000 + 17 * step)
    grads: dict[str, Any] = {
        n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()
    }
    if step % 2:
        # Sparse rows of the embedding, with a repeat, spanning every shard's piece.
        rows = np.array([1, 20, 20, 47, 30, 13])
        grads["embedding"] = (rows, rng.standard_normal((len(rows), 8)).astype(np.float32))
    return grads


def _sharded(servers: list[LocalServer]) -> ShardedClient:
    client = Client(
        [s.address for s in servers],
        worker_id="w0",
        timeout_s=30,
        split_threshold_bytes=SPLIT_BYTES,
    )
    assert isinstance(client, ShardedClient)
    return client


def _assert_same_job(single: Client, sharded: ShardedClient) -> None:
    """Weights and every optimizer variable bit for bit equal, at one version."""
    for a, b in (
        (single.pull(), sharded.pull()),
        (single.optimizer_state(), sharded.optimizer_state()),
    ):
        assert a.version == b.version
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name, strict=True)


def _restore(directory: Path, client: ShardedClient, *, by_id: bool) -> None:
    """Restore shard i's file on shard i: UploadSnapshot with restore, or UploadSnapshot
    then RestoreSnapshot by its id."""
    for index, shard in enumerate(client.shards):
        path = directory / f"shard-{index}.safetensors"
        if by_id:
            info = shard.upload_snapshot(path)
            assert shard.restore(info.id).version == info.version
        else:
            shard.upload_snapshot(path, restore=True)


def _run_chain(
    jobs: dict[str, Any],
    mode: str,
    make: Any,
    sizes: tuple[int, ...],
    tmp_path: Path,
    *,
    via: str = "offline",
) -> list[dict[str, Any]]:
    """Train a job of ``sizes[0]`` shards, then re-shard it through ``sizes``, checking it
    against one server after every restore and at the end; the manifests written.

    ``via="offline"``: ``reshard`` then each file restored on its shard; ``via="rpc"``:
    the snapshot of the old size uploaded to the new job, which re-shards it itself."""
    one, sharded_servers = jobs[mode]
    single = Client(one.address, worker_id="w0", timeout_s=30)
    clients = [_sharded(sharded_servers[n]) for n in sizes]
    manifests = []
    try:
        single.create_model(_initial(), make())
        clients[0].create_model(_initial(), make())
        step = 0
        for index, client in enumerate(clients):
            if index:
                cut = tmp_path / f"cut-{index}"
                take_sharded_snapshot(clients[index - 1], cut)
                clients[index - 1].delete_model()
                if via == "rpc":
                    info = client.upload_snapshot(cut, restore=True)
                    assert info.cut_id.startswith("reshard-")
                    parts = info.shard_snapshots
                    assert [p.cut_id for p in parts] == [info.cut_id] * sizes[index]
                    assert info.cut_id in [c.cut_id for c in client.list_snapshots()]
                else:
                    out = tmp_path / f"resharded-{index}"
                    manifest = reshard(cut, out, sizes[index])
                    manifests.append(manifest)
                    assert manifest["shards"] == sizes[index]
                    assert [f["file"] for f in manifest["files"]] == [
                        f"shard-{i}.safetensors" for i in range(sizes[index])
                    ]
                    _restore(out, client, by_id=mode == "async")
                _assert_same_job(single, client)
            for _ in range(STEPS):
                single.step(_gradients(step))
                client.step(_gradients(step))
                step += 1
        _assert_same_job(single, clients[-1])
        # The dedupe table came along: every shard knows the worker's sequences, which
        # continued from the last one before each cut.
        for status in clients[-1].status().shard_statuses:
            assert status.worker("w0").last_sequence == clients[-1].last_sequence
    finally:
        for client in [single, *clients]:
            with contextlib.suppress(Exception):  # a test that failed may leave none
                client.delete_model()
            client.close()
    return manifests


@pytest.mark.parametrize("name, make", SPLIT, ids=[n for n, _ in SPLIT])
def test_reshard_3_2_4_splits_rows_and_equals_one_server(
    jobs: dict[str, Any], tmp_path: Path, name: str, make: Any
) -> None:
    manifests = _run_chain(jobs, "sync", make, SIZES, tmp_path)
    for manifest, shards in zip(manifests, SIZES[1:], strict=True):
        embedding = next(v for v in manifest["layout"]["variables"] if v["name"] == "embedding")
        assert len(embedding["pieces"]) == shards  # split across every shard of the new job
        assert manifest["split_threshold_bytes"] == SPLIT_BYTES


@pytest.mark.parametrize("name, make", WHOLE, ids=[n for n, _ in WHOLE])
def test_reshard_3_2_4_moves_whole_variables_and_equals_one_server(
    jobs: dict[str, Any], tmp_path: Path, name: str, make: Any
) -> None:
    manifests = _run_chain(jobs, "sync", make, SIZES, tmp_path)
    for manifest in manifests:
        assert all(len(v["pieces"]) == 1 for v in manifest["layout"]["variables"])


def test_reshard_an_async_job(jobs: dict[str, Any], tmp_path: Path) -> None:
    _run_chain(jobs, "async", lambda: optim_core.Adam(0.01), (3, 2), tmp_path)


# --- re-sharded over RPC: a snapshot uploaded to a job of another size ------------------------
@pytest.mark.parametrize(
    "name, make",
    [SPLIT[0], SPLIT[-1], WHOLE[0]],
    ids=[SPLIT[0][0], SPLIT[-1][0], WHOLE[0][0]],
)
def test_upload_to_a_job_of_another_size_reshards_it(
    jobs: dict[str, Any], tmp_path: Path, name: str, make: Any
) -> None:
    _run_chain(jobs, "sync", make, SIZES, tmp_path, via="rpc")


def test_upload_of_a_sharded_snapshot_to_one_server(
    jobs: dict[str, Any], tmp_path: Path
) -> None:
    """3 shards -> one plain server (``Client(address)``), which keeps the whole model."""
    one, sharded_servers = jobs["sync"]
    single = Client(one.address, worker_id="w0", timeout_s=30)
    three = _sharded(sharded_servers[3])
    reference = Client(sharded_servers[2][0].address, worker_id="w0", timeout_s=30)
    try:
        three.create_model(_initial(), optim_core.Adam(0.01))
        for step in range(2):
            three.step(_gradients(step))
        take_sharded_snapshot(three, tmp_path / "cut")
        info = single.upload_snapshot(tmp_path / "cut", restore=True)
        assert info.version == 2 and info.cut_id.startswith("reshard-")
        _assert_same_job(single, three)
        single.step(_gradients(2))
        three.step(_gradients(2))
        _assert_same_job(single, three)
    finally:
        for client in (single, three):
            with contextlib.suppress(Exception):
                client.delete_model()
            client.close()
        reference.close()


def test_a_bad_resharded_upload_is_refused_and_changes_nothing(
    jobs: dict[str, Any], cut: dict[str, Path], tmp_path: Path
) -> None:
    """The server checks what it is sent (whatever the SDK checked before): a damaged file,
    another shard's index, a short stream; the job keeps its model and snapshots."""
    from paramserve.client import InvalidArgumentError
    from paramserve.v1 import parameter_server_pb2 as pb

    client = _sharded(jobs["sync"][1][2])
    try:
        client.create_model(_initial(), optim_core.Adam(0.01))
        client.step(_gradients(0))
        before = [s.list_snapshots() for s in client.shards]
        weights = client.pull()
        directory = _copy(cut, tmp_path)
        raw = (directory / MANIFEST).read_bytes()
        files = [directory / f"shard-{i}.safetensors" for i in range(3)]

        def upload(index: int, paths: list[Path], **fields: Any) -> None:
            header = {"manifest": raw, "shards": 2, "shard_index": index, "cut_id": "c-bad"}
            header.update(fields)
            client.shards[index]._upload(
                paths,
                restore=True,
                progress=False,
                timeout_s=30,
                reshard=pb.ReshardUpload(**header),
            )

        with pytest.raises(InvalidArgumentError, match="this server is shard 0 of 2"):
            upload(0, files, shard_index=1)
        with pytest.raises(InvalidArgumentError, match="declares"):
            upload(0, files[:2])
        with pytest.raises(InvalidArgumentError, match="not a sharded snapshot manifest"):
            upload(0, files, manifest=b'{"format": "zip"}')
        # One shard's plain client sends a directory as for a job of one server.
        with pytest.raises(InvalidArgumentError, match="shard 0 of 1, and this server is shard 1"):
            client.shards[1].upload_snapshot(directory)
        data = bytearray(files[1].read_bytes())
        data[len(data) // 2] ^= 0xFF
        files[1].write_bytes(bytes(data))
        with pytest.raises(InvalidArgumentError, match="sha256") as caught:
            upload(1, files)
        assert caught.value.reason == "SNAPSHOT_INVALID"
        assert [s.list_snapshots() for s in client.shards] == before
        for server in jobs["sync"][1][2]:  # no scratch file or folder left behind
            assert not list(Path(server.config.checkpoint_dir).glob(".tmp-*"))
        after = client.pull()
        assert after.version == weights.version
        for name in weights:
            np.testing.assert_array_equal(after[name], weights[name])
        with pytest.raises(ValueError, match="sha256"):  # the SDK checks before sending
            client.upload_snapshot(directory)
    finally:
        with contextlib.suppress(Exception):
            client.delete_model()
        client.close()


# --- one cut, read and re-sharded without servers -------------------------------------------
@pytest.fixture(scope="module")
def cut(jobs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-shard Adam job's cut after 2 steps, and shard 1's file of the same job a step
    later (to mix versions)."""
    root = tmp_path_factory.mktemp("reshard-cut")
    client = _sharded(jobs["sync"][1][3])
    with client:
        client.create_model(_initial(), optim_core.Adam(0.01))
        try:
            for step in range(2):
                client.step(_gradients(step))
            take_sharded_snapshot(client, root / "cut")
            client.step(_gradients(2))
            later = client.shards[1].snapshot()
            client.shards[1].download_snapshot(later, root / "later-shard-1.safetensors")
        finally:
            client.delete_model()
    return {"cut": root / "cut", "later": root / "later-shard-1.safetensors"}


def _copy(cut: dict[str, Path], tmp_path: Path) -> Path:
    directory = tmp_path / "in"
    shutil.copytree(cut["cut"], directory)
    return directory


def _tensors(state: SnapshotState) -> dict[str, np.ndarray]:
    model = state.model
    return {
        **{f"variables/{n}": a for n, a in model.variables.items()},
        **{f"optimizer/{n}": a for n, a in model.optimizer_state.items()},
    }


def _assert_same_files(a: Path, b: Path) -> None:
    first, second = load_sharded_snapshot(a), load_sharded_snapshot(b)
    assert first.layout == second.layout
    for x, y in zip(first.states, second.states, strict=True):
        tx, ty = _tensors(x), _tensors(y)
        assert sorted(tx) == sorted(ty)
        for key in tx:
            np.testing.assert_array_equal(tx[key], ty[key], err_msg=key, strict=True)
        assert x.aggregation == y.aggregation
        assert (x.model.model_name, x.model.optimizer, x.model.version) == (
            y.model.model_name,
            y.model.optimizer,
            y.model.version,
        )


def test_round_trips_are_the_identity(cut: dict[str, Path], tmp_path: Path) -> None:
    """3 -> 3 gives the same files' contents; 3 -> 1 -> 3 and 3 -> 5 -> 3 too."""
    reshard(cut["cut"], tmp_path / "three", 3)
    _assert_same_files(cut["cut"], tmp_path / "three")
    for via in (1, 5):
        reshard(cut["cut"], tmp_path / f"via-{via}", via)
        reshard(tmp_path / f"via-{via}", tmp_path / f"back-{via}", 3)
        _assert_same_files(cut["cut"], tmp_path / f"back-{via}")
    # One shard: the whole model, as one server holds it, and shard 0's dedupe table.
    whole = read_snapshot_file(tmp_path / "via-1" / "shard-0.safetensors")
    merged = merge_shards(load_sharded_snapshot(cut["cut"]))
    assert list(whole.model.variables) == list(merged.model.variables)
    for key, value in _tensors(merged).items():
        np.testing.assert_array_equal(_tensors(whole)[key], value, err_msg=key, strict=True)
    original = load_sharded_snapshot(cut["cut"])
    assert whole.aggregation == original.states[0].aggregation
    assert whole.aggregation["workers"]["w0"]["last_sequence"] >= 2


def test_the_new_manifest(cut: dict[str, Path], tmp_path: Path) -> None:
    before = json.loads((cut["cut"] / MANIFEST).read_text())
    after = reshard(cut["cut"], tmp_path / "out", 2, split_threshold_bytes=1 << 20)
    assert after == json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert after["version"] == before["version"] == 2
    assert after["cut_id"] != before["cut_id"]
    assert after["split_threshold_bytes"] == 1 << 20
    assert after["layout"]["shards"] == 2
    # Nothing is split under the larger threshold.
    assert all(len(v["pieces"]) == 1 for v in after["layout"]["variables"])
    ids = {f["snapshot_id"] for f in after["files"]}
    assert len(ids) == 1 and ids.pop().startswith("snap-000000000002-")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        MANIFEST,
        "shard-0.safetensors",
        "shard-1.safetensors",
    ]
    # Nothing is left next to it either (the temporary folder was renamed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_mixed_dtypes_without_servers(tmp_path: Path) -> None:
    """bfloat16, float16, float32 and float64 variables under Nadam (whose step-wide product
    is kept in each shard's first variable's dtype), 3 -> 2 -> 1 shards, bit for bit."""
    rng = np.random.default_rng(0)
    variables = [
        Variable(rng.standard_normal((40, 4)).astype(ml_dtypes.bfloat16), path="embedding"),
        Variable(rng.standard_normal(5).astype(np.float16), path="half"),
        Variable(rng.standard_normal((4, 3)).astype(np.float32), path="single"),
        Variable(rng.standard_normal(3).astype(np.float64), path="double"),
    ]
    optimizer = optim_core.Nadam(0.01)
    with np.errstate(all="ignore"):
        for _ in range(3):
            optimizer.apply(
                [rng.standard_normal(v.shape).astype(v.dtype) for v in variables], variables
            )
    model = ModelState(
        model_name="mixed",
        optimizer=optim_core.serialize(optimizer),
        variables={v.path: v.numpy() for v in variables},
        optimizer_state=optimizer.state_dict(),
        version=optimizer.iterations,
    )
    aggregation = _table({"w": (3, [[1, 3, "s"]])})
    layout = partition(
        {n: (a.dtype.name, a.shape) for n, a in model.variables.items()},
        3,
        split_threshold_bytes=64,
    )
    assert layout.by_name()["embedding"].split
    parts = split_model(SnapshotState(model=model, aggregation=aggregation), layout)
    write_sharded_snapshot(
        tmp_path / "three", parts, layout=layout, cut_id="mixed", split_threshold_bytes=64
    )
    reshard(tmp_path / "three", tmp_path / "two", 2)
    reshard(tmp_path / "two", tmp_path / "one", 1)
    whole = read_snapshot_file(tmp_path / "one" / "shard-0.safetensors")
    expected = _tensors(SnapshotState(model=model, aggregation=aggregation))
    assert sorted(_tensors(whole)) == sorted(expected)
    for key, value in _tensors(whole).items():
        assert value.dtype == expected[key].dtype, key
        assert value.tobytes() == expected[key].tobytes(), key
    assert whole.aggregation == check_aggregation_state(aggregation)


# --- refusals -----------------------------------------------------------------------------
def _refused(directory: Path, tmp_path: Path, match: str, shards: int = 2) -> None:
    out = tmp_path / "out"
    with pytest.raises(ShardedSnapshotError, match=match):
        reshard(directory, out, shards)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_changed_file_is_refused(cut: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(cut, tmp_path)
    path = directory / "shard-1.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(directory, tmp_path, r"shard 1's file .* fails its sha256 check")


def test_a_truncated_file_is_refused(cut: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(cut, tmp_path)
    path = directory / "shard-2.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    _refused(directory, tmp_path, r"shard 2's file .* has \d+ bytes, the manifest says")


def test_a_missing_file_is_refused(cut: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(cut, tmp_path)
    (directory / "shard-2.safetensors").unlink()
    _refused(directory, tmp_path, r"shard 2's file .*shard-2.safetensors is missing")


def test_a_missing_manifest_is_refused(cut: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(cut, tmp_path)
    (directory / MANIFEST).unlink()
    _refused(directory, tmp_path, "is not a sharded snapshot: it has no manifest.json")


def test_a_corrupt_snapshot_with_a_matching_manifest_is_refused(
    cut: dict[str, Path], tmp_path: Path
) -> None:
    """The sha256 in the manifest is no substitute for the file's own checks."""
    directory = _copy(cut, tmp_path)
    path = directory / "shard-0.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last tensor's bytes
    path.write_bytes(bytes(data))
    rewrite_manifest(directory)
    _refused(directory, tmp_path, r"shard 0 \(.*\): tensor .* fails its sha256 check")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"format": "paramserve.snapshot"}, "is not a sharded snapshot manifest"),
        ({"shards": 2}, "files must list the 2 shards' files"),
        ({"version": 7}, r"the shards are at versions \[2, 2, 2\] and the manifest says 7"),
        ({"partitioner_version": 99}, "partitioner_version 99 is newer"),
    ],
    ids=["format_version", "format", "shards", "version", "partitioner_version"],
)
def test_a_manifest_that_does_not_fit_is_refused(
    cut: dict[str, Path], tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    directory = _copy(cut, tmp_path)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(change)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    _refused(directory, tmp_path, match)


def test_a_layout_that_does_not_fit_the_files_is_refused(
    cut: dict[str, Path], tmp_path: Path
) -> None:
    directory = _copy(cut, tmp_path)
    manifest = json.loads((directory / MANIFEST).read_text())
    embedding = next(v for v in manifest["layout"]["variables"] if v["name"] == "embedding")
    embedding["pieces"][0][2] -= 1
    embedding["pieces"][1][1] -= 1
    (directory / MANIFEST).write_text(json.dumps(manifest))
    _refused(directory, tmp_path, r"does not match the variables .*'embedding'")


def test_shards_at_different_versions_are_refused(cut: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(cut, tmp_path)
    shutil.copyfile(cut["later"], directory / "shard-1.safetensors")
    rewrite_manifest(directory)
    _refused(directory, tmp_path, r"the shards are at versions \[2, 3, 2\]")


def _edit_shard(directory: Path, shard: int, edit: Any) -> None:
    """Rewrite shard ``shard``'s file (a valid snapshot) after ``edit(state)``."""
    path = directory / f"shard-{shard}.safetensors"
    state = read_snapshot_file(path)
    edit(state)
    write_snapshot_file(path, state)
    rewrite_manifest(directory)


def test_shards_of_another_model_are_refused(cut: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(cut, tmp_path)
    _edit_shard(directory, 1, lambda s: setattr(s.model, "model_name", "other"))
    _refused(directory, tmp_path, "shard 1 holds model 'other', shard 0 holds 'model'")


def test_shards_with_another_optimizer_config_are_refused(
    cut: dict[str, Path], tmp_path: Path
) -> None:
    def edit(state: SnapshotState) -> None:
        state.model.optimizer["config"]["beta_1"] = 0.5

    directory = _copy(cut, tmp_path)
    _edit_shard(directory, 2, edit)
    _refused(directory, tmp_path, "shard 2's optimizer config differs from shard 0's")


def test_shards_with_another_step_wide_state_are_refused(
    cut: dict[str, Path], tmp_path: Path
) -> None:
    def edit(state: SnapshotState) -> None:
        state.model.optimizer_state["learning_rate"] = np.array(0.5, dtype=np.float32)

    directory = _copy(cut, tmp_path)
    _edit_shard(directory, 2, edit)
    _refused(
        directory,
        tmp_path,
        r"step-wide optimizer state 'learning_rate' differs between shards: shard 0 has "
        r"0\.01.*, shard 2 has 0\.5",
    )


def test_an_existing_out_is_refused_and_an_empty_one_is_used(
    cut: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ShardedSnapshotError, match="exists and is not empty"):
        reshard(cut["cut"], out, 2)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(ShardedSnapshotError, match="exists and is not a directory"):
        reshard(cut["cut"], file, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reshard(cut["cut"], empty, 2)["shards"] == 2
    assert (empty / MANIFEST).is_file()


def test_too_many_shards_for_the_model_are_refused(cut: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ShardedSnapshotError, match="5 variables cannot fill 6 shards"):
        reshard(cut["cut"], tmp_path / "out", 6, split_threshold_bytes=1 << 30)
    assert not (tmp_path / "out").exists()


# --- the aggregation state ------------------------------------------------------------------
def _table(workers: dict[str, tuple[int, list[list[Any]]]], completed: int = 5) -> dict[str, Any]:
    return {
        "format_version": 2,
        "workers": {
            w: {"last_sequence": last, "pushes": last, "clock": last, "session": "s", "recent": r}
            for w, (last, r) in workers.items()
        },
        "rounds_completed": completed,
        "rounds_aborted": 1 if completed == 5 else 0,
        "rounds_partial": 0,
    }


def test_merge_aggregation() -> None:
    """Shard 0's counters; per worker the highest sequence, the recent sequences of all."""
    shard0 = _table({"a": (4, [[1, 4, "s"]]), "b": (2, [[1, 2, "s"]])})
    shard1 = _table({"a": (5, [[1, 3, "s"], [5, 5, "s"]]), "c": (1, [[1, 1, "s"]])}, 4)
    merged = merge_aggregation([shard0, shard1])
    assert (merged["rounds_completed"], merged["rounds_aborted"]) == (5, 1)
    assert merged["workers"]["a"]["last_sequence"] == 5
    assert merged["workers"]["a"]["recent"] == [[1, 5, "s"]]
    assert merged["workers"]["b"] == shard0["workers"]["b"]
    assert merged["workers"]["c"]["last_sequence"] == 1
    # Equal tables (a sync job at one version) merge into shard 0's.
    assert merge_aggregation([shard0, shard0, shard0]) == shard0


# --- the command line -------------------------------------------------------------------------
def test_cli(cut: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["snapshot", "reshard", str(cut["cut"]), str(out), "--shards", "2"]
    assert cli.main([*argv, "--split-threshold-bytes", "1KiB"]) == 0
    captured = capsys.readouterr()
    manifest = json.loads(captured.out)
    assert manifest == json.loads((out / MANIFEST).read_text())
    assert manifest["split_threshold_bytes"] == 1024
    assert captured.err.strip() == (
        f"resharded {cut['cut']} (version 2) for 2 shard(s) into {out}: restore "
        "shard-i.safetensors on shard i"
    )
    # A refusal is one line, exit status 1.
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("paramserve snapshot reshard: ") and "is not empty" in err
