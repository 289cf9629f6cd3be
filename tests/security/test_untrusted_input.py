"""Nothing from the network or from a snapshot is unpickled or evaluated.

A cheap guard scans the package sources for the constructs that could (pickle, marshal,
eval, exec, ``allow_pickle=True``, unsafe YAML loading); then crafted snapshot files and
requests that would run code if anything did unpickle or evaluate them are refused, and the
code never runs (it would create a marker directory).
"""

from __future__ import annotations

import ast
import json
import os
import pickle  # only to craft the hostile payloads below
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from paramserve import wire
from paramserve.client import Client, InvalidArgumentError
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.wire import chunk_messages

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("optim_core", "server", "client")
BANNED_MODULES = {
    "pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve",
    "copyreg",
}  # fmt: skip
BANNED_CALLS = {"eval", "exec", "compile", "__import__", "execfile"}
BANNED_ATTRIBUTES = {"read_pickle", "to_pickle", "unsafe_load", "full_load", "loads_pickle"}


def scan_source(source: str, filename: str = "<source>") -> list[str]:
    """Lines of ``source`` that use a construct able to unpickle or evaluate data."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if _banned_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and _banned_module(node.module):
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_ATTRIBUTES:
            found.append(f"{where} .{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in BANNED_CALLS:
                found.append(f"{where} {func.id}(...)")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{where} allow_pickle={ast.unparse(kw.value)}")
            name = ast.unparse(func)
            if name.endswith("yaml.load"):
                loader = next((kw.value for kw in node.keywords if kw.arg == "Loader"), None)
                if loader is None or "SafeLoader" not in ast.unparse(loader):
                    found.append(f"{where} {name}(...) without a SafeLoader")
            if name.endswith(("import_module", "__import__")) and node.args:
                target = node.args[0]
                if isinstance(target, ast.Constant) and _banned_module(str(target.value)):
                    found.append(f"{where} {name}({target.value!r})")
    return found


def _banned_module(name: str) -> bool:
    return name.split(".")[0] in BANNED_MODULES


def _package_files() -> list[Path]:
    files = [p for d in PACKAGE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20, "the package sources were not found"
    return files


def test_package_sources_never_unpickle_or_evaluate():
    found = []
    for path in _package_files():
        found += scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert found == [], "constructs that can run code from data:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import _pickle as p",
        "from pickle import loads",
        "import marshal",
        "from dill import loads",
        "import importlib\nimportlib.import_module('pickle')",
        "eval('1 + 1')",
        "exec('x = 1')",
        "np.load(path, allow_pickle=True)",
        "np.load(path, allow_pickle=flag)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import pandas as pd\npd.read_pickle(path)",
    ],
)
def test_the_scanner_catches(snippet):
    assert scan_source(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        '"""Nothing is ever pickled; never eval."""',
        "# we never call eval( or exec( here",
        "import re\nre.compile('x')",
        "np.load(path)",
        "np.load(path, allow_pickle=False)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(text)",
        "json.loads(text)",
    ],
)
def test_the_scanner_allows(snippet):
    assert scan_source(snippet) == []


# -- hostile files and requests ------------------------------------------------------------


class _MakeMarker:
    """Unpickling this creates ``path`` (a directory): proof that something ran the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_the_payload_is_live(tmp_path):
    """Unpickling the payload does create the marker, so its absence below means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_MakeMarker(marker)))
    assert marker.is_dir()


@pytest.fixture
def trained(start_server, tmp_path):
    """A client of a server with snapshots on: one snapshot at version 1, live at version 2."""
    ckpt = tmp_path / "ckpt"
    server = start_server(checkpoint_dir=ckpt)
    client = Client(server.address, wait_for_ready=False, timeout_s=20)
    client.create_model({"w": np.arange(4, dtype=np.float32)}, optimizer="adam")
    client.push({"w": np.ones(4, np.float32)})
    snapshot = client.snapshot()
    client.push({"w": np.ones(4, np.float32)})
    yield client, ckpt, snapshot
    client.close()


def _state(client: Client) -> tuple[int, np.ndarray]:
    weights = client.pull()
    return weights.version, np.array(weights["w"])


def _assert_unchanged(client: Client, before: tuple[int, np.ndarray]) -> None:
    version, w = _state(client)
    assert version == before[0]
    np.testing.assert_array_equal(w, before[1], strict=True)


HOSTILE_ID = "snap-000000000099-20260101T000000000000Z"


def test_a_pickle_file_posing_as_a_snapshot_is_refused_unexecuted(trained, tmp_path):
    client, ckpt, _ = trained
    marker = tmp_path / "pickle-ran"
    (ckpt / f"{HOSTILE_ID}.safetensors").write_bytes(pickle.dumps(_MakeMarker(marker)))
    before = _state(client)
    with pytest.raises(InvalidArgumentError, match="not a readable safetensors file"):
        client.restore(HOSTILE_ID)
    # Uploaded over the network, with and without restore.
    upload = tmp_path / "upload.safetensors"
    upload.write_bytes(pickle.dumps(_MakeMarker(marker)))
    for restore in (False, True):
        with pytest.raises(InvalidArgumentError, match="safetensors"):
            client.upload_snapshot(upload, restore=restore)
    assert not marker.exists()
    _assert_unchanged(client, before)


def test_resume_skips_a_pickle_file_unexecuted(start_server, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "pickle-ran"
    (ckpt / f"{HOSTILE_ID}.safetensors").write_bytes(pickle.dumps(_MakeMarker(marker)))
    server = start_server(checkpoint_dir=ckpt, resume=True)
    with Client(server.address, wait_for_ready=False, timeout_s=20) as client:
        assert client.status().has_model is False
    assert not marker.exists()


def _rewrite(path: Path, target: Path, *, manifest: str | None = None, **changes) -> None:
    """Copy the snapshot at ``path`` to ``target`` with its manifest text or fields replaced."""
    with safetensors.safe_open(path, framework="np") as handle:
        metadata = dict(handle.metadata())
    tensors = safetensors.numpy.load_file(path)
    if manifest is None:
        fields = json.loads(metadata["manifest"])
        fields.update(changes)
        manifest = json.dumps(fields)
    metadata["manifest"] = manifest
    safetensors.numpy.save_file(tensors, target, metadata=metadata)


def test_a_pickle_in_the_safetensors_metadata_is_refused_unexecuted(trained, tmp_path):
    client, ckpt, snapshot = trained
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_MakeMarker(marker), protocol=0).decode("latin-1")
    source = ckpt / f"{snapshot.id}.safetensors"
    _rewrite(source, ckpt / f"{HOSTILE_ID}.safetensors", manifest=payload)
    before = _state(client)
    with pytest.raises(InvalidArgumentError, match="manifest is not valid JSON"):
        client.restore(HOSTILE_ID)
    assert not marker.exists()
    _assert_unchanged(client, before)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"module": "os", "class_name": "system", "config": {"command": "mkdir {marker}"}},
        {"module": "builtins", "class_name": "eval", "config": {"source": "1"}},
        {
            "class_name": "SGD",
            "config": {
                "learning_rate": {
                    "module": "os",
                    "class_name": "system",
                    "config": {"command": "mkdir {marker}"},
                }
            },
        },
    ],
    ids=["os.system", "builtins.eval", "schedule-os.system"],
)
def test_code_named_in_a_snapshot_optimizer_config_is_refused(trained, tmp_path, optimizer):
    client, ckpt, snapshot = trained
    marker = tmp_path / "code-ran"
    optimizer = json.loads(json.dumps(optimizer).replace("{marker}", str(marker)))
    _rewrite(
        ckpt / f"{snapshot.id}.safetensors",
        ckpt / f"{HOSTILE_ID}.safetensors",
        optimizer=optimizer,
    )
    before = _state(client)
    with pytest.raises(InvalidArgumentError, match=r"optimizer|schedule"):
        client.restore(HOSTILE_ID)
    assert not marker.exists()
    _assert_unchanged(client, before)


@pytest.mark.parametrize(
    "optimizer_json",
    [
        '{"module": "os", "class_name": "system", "config": {"command": "mkdir {marker}"}}',
        "__import__('os').mkdir('{marker}')",
        "eval(\"__import__('os').mkdir('{marker}')\")",
        "!!python/object/apply:os.mkdir ['{marker}']",
    ],
    ids=["json-os.system", "python-expression", "eval-call", "yaml-tag"],
)
def test_code_in_a_create_model_optimizer_is_refused(start_server, tmp_path, optimizer_json):
    marker = tmp_path / "code-ran"
    server = start_server()
    values = [np.zeros(2, np.float32)]
    header = pb.CreateModelHeader(
        model_name="m",
        optimizer_json=optimizer_json.replace("{marker}", str(marker)),
        variables=[wire.header_for("w", values[0])],
    )
    requests = [pb.CreateModelRequest(header=header)]
    requests += [pb.CreateModelRequest(chunk=c) for c in chunk_messages(values)]
    requests.append(pb.CreateModelRequest(end=tpb.StreamEnd()))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateModel(iter(requests), timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=20)
        assert status.has_model is False
    assert not marker.exists()
