"""The daemon around the servicer: health, reflection, metrics, configuration, signals,
and the message conversions of Describe, GetStatus, Pull, optimizer state and snapshots.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from paramserve import wire
from paramserve.server import cli
from paramserve.server.app import create_server
from paramserve.server.config import ConfigError, ServerConfig, load_config
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.models.tiny import grads_for, initial_variables
from tests.support.processes import free_port as _free_port
from tests.support.wire import (
    TIMEOUT_S,
    chunk_messages,
    create_model_requests,
    push_requests,
    read_stream,
)

SERVICE = "paramserve.v1.ParameterServer"
REPO = Path(__file__).resolve().parents[2]


# -- health, reflection, metrics -----------------------------------------------------------


def test_health_serving_then_not_serving_on_stop(start_server):
    h = start_server()
    health = health_pb2_grpc.HealthStub(h.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", SERVICE):
        request = health_pb2.HealthCheckRequest(service=service)
        assert health.Check(request, timeout=TIMEOUT_S).status == serving
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT_S)
    assert next(watch).status == serving
    stopper = threading.Thread(target=h.server.stop, args=(1.0,))
    stopper.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    stopper.join(TIMEOUT_S)
    assert h.server.wait(0)


def test_reflection_lists_the_service(start_server):
    h = start_server()
    stub = reflection_pb2_grpc.ServerReflectionStub(h.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listed, files = list(stub.ServerReflectionInfo(iter(requests), timeout=TIMEOUT_S))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert files.file_descriptor_response.file_descriptor_proto  # the .proto is resolvable


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT_S) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not exposed"
    return float(match.group(1))


def test_metrics_endpoint_counts_pushes(start_server):
    h = start_server(metrics_port=_free_port())
    other = start_server(metrics_port=_free_port())  # its own registry: no clash, no sharing
    h.create()
    h.push(grads_for())
    h.push(grads_for())  # same sequence: a dedupe hit
    h.pull()
    text = _scrape(h.server.metrics_port)
    assert _metric(text, 'paramserve_pushes_total{outcome="applied"}') == 1
    assert _metric(text, 'paramserve_pushes_total{outcome="duplicate"}') == 1
    assert _metric(text, "paramserve_dedupe_hits_total") == 1
    assert _metric(text, 'paramserve_received_bytes_total{method="Push"}') == 2 * 32
    assert _metric(text, 'paramserve_sent_bytes_total{method="Pull"}') == 32
    assert _metric(text, 'paramserve_pulls_total{outcome="ok"}') == 1
    assert _metric(text, "paramserve_apply_seconds_count") == 1
    assert _metric(text, "paramserve_round_wait_seconds_count") == 2
    assert _metric(text, "paramserve_model_version") == 1
    assert _metric(text, 'paramserve_rpcs_total{code="OK",method="CreateModel"}') == 1
    assert "paramserve_pushes_total{" not in _scrape(other.server.metrics_port)


# -- configuration -------------------------------------------------------------------------


def test_config_precedence_toml_env_flags(tmp_path):
    toml = tmp_path / "paramserve.toml"
    toml.write_text(
        'port = 1111\nmode = "async"\nreplicas = 3\nround_timeout_s = 5\n'
        'nonfinite = "skip"\n[limits]\nmax_tensor_bytes = "1MiB"\nmax_variables = 7\n'
    )
    env = {
        "PARAMSERVE_PORT": "2222",
        "PARAMSERVE_REPLICAS": "4",
        "PARAMSERVE_MAX_TENSOR_BYTES": "2MiB",
        "PARAMSERVE_RESUME": "false",
        "PARAMSERVE_ADDRESS": "not a config field: ignored",
    }
    args = cli.build_parser().parse_args(
        ["serve", "--config", str(toml), "--port", "3333", "--max-variables", "9"]
    )
    config = cli.config_from_args(args, env=env)
    assert config.port == 3333  # flag over env over TOML
    assert config.limits.max_variables == 9  # flag over TOML
    assert config.aggregation.replicas == 4  # env over TOML
    assert config.limits.max_tensor_bytes == 2 << 20  # env over TOML
    agg = config.aggregation
    assert (agg.mode, agg.round_timeout_s, config.nonfinite) == ("async", 5.0, "skip")
    assert config.host == "127.0.0.1" and config.device == "cpu"  # defaults
    env["PARAMSERVE_CONFIG"] = str(toml)  # the file may also come from the environment
    assert load_config(env=env).port == 2222


@pytest.mark.parametrize(
    "toml, env, match",
    [
        ("bogus_key = 1\n", {}, "bogus_key"),
        ('mode = "eventually"\n', {}, "mode"),
        ("", {"PARAMSERVE_PORT": "eighty"}, "port"),
        ("", {"PARAMSERVE_MAX_MESSAGE_BYTES": "12 parsecs"}, "byte size"),
        ("resume = true\n", {}, "checkpoint_dir"),
        ("[limits]\nmax_tensors = 3\n", {}, "max_tensors"),
    ],
)
def test_config_errors_name_the_setting(tmp_path, toml, env, match):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(config_file=path, env=env)


def test_default_bind_is_loopback(start_server):
    assert ServerConfig().host == "127.0.0.1"
    assert cli.config_from_args(cli.build_parser().parse_args(["serve"]), env={}).host == (
        "127.0.0.1"
    )
    h = start_server()
    assert h.server.address == f"127.0.0.1:{h.server.port}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outbound interface
            outside = s.getsockname()[0]
    except OSError:
        outside = None
    if outside and not outside.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((outside, h.server.port), timeout=2).close()


def test_port_in_use_is_an_os_error(harness):
    before = harness.state()
    with pytest.raises(OSError, match="cannot listen"):
        create_server(ServerConfig(port=harness.server.port))
    harness.assert_unchanged(before)  # the first server is unaffected


# -- signals -------------------------------------------------------------------------------


def _read_address(proc: subprocess.Popen, lines: list[str]) -> str:
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        lines.append(line)
        try:
            message = json.loads(line)["message"]
        except (ValueError, KeyError):
            continue
        match = re.search(r"listening on (\S+)", message)
        if match:
            return match.group(1)
        assert time.monotonic() < deadline
    raise AssertionError("server exited before listening:\n" + "".join(lines))


def test_sigterm_exits_zero_with_final_snapshot(tmp_path):
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, "-m", "paramserve.server", "serve", "--port", "0", "--mode"]
    command += ["async", "--checkpoint-dir", str(ckpt), "--log-format", "json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVE_")}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    try:
        address = _read_address(proc, lines)
        drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        drain.start()
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            stub.CreateModel(create_model_requests(initial_variables()), timeout=TIMEOUT_S)
            stub.Push(iter(push_requests(grads_for())), timeout=TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines)  # a hang guard, not a speed test
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    snapshots = sorted(ckpt.glob("snap-*.safetensors"))
    assert len(snapshots) == 1 and snapshots[0].name.startswith("snap-000000000001-")
    # --resume brings the state back exactly.
    resumed = create_server(ServerConfig(port=0, checkpoint_dir=ckpt, resume=True))
    try:
        with grpc.insecure_channel(resumed.address) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            version, values = read_stream(stub.Pull(pb.PullRequest(), timeout=TIMEOUT_S))
    finally:
        resumed.stop(0)
    assert version == 1
    for name, value in initial_variables().items():
        np.testing.assert_array_equal(values[name], value - np.float32(0.5) * grads_for()[name])


def test_periodic_snapshots_only_when_the_version_moved(start_server, tmp_path):
    ckpt = tmp_path / "ckpt"
    h = start_server(checkpoint_dir=ckpt, snapshot_every_s=0.1, keep_snapshots=1)
    core = h.server.core
    take_snapshot = core.take_snapshot
    written: list[tuple[str, int]] = []
    changed = threading.Condition()

    def recorded_snapshot(*, trigger: str):
        info = take_snapshot(trigger=trigger)  # written, renamed, retention applied
        with changed:
            written.append((trigger, info.version))
            changed.notify_all()
        return info

    core.take_snapshot = recorded_snapshot  # type: ignore[method-assign]
    h.create()
    for sequence in (1, 2):
        h.push(grads_for(), sequence=sequence)
        with changed:
            assert changed.wait_for(lambda s=sequence: ("periodic", s) in written, TIMEOUT_S)
    # Unchanged version: no new files (the sleep only gives a bug time to show; nothing needs
    # to happen in it). keep_snapshots=1 pruned the earlier ones.
    time.sleep(0.3)
    assert [p.name[:17] for p in ckpt.glob("snap-*.safetensors")] == ["snap-000000000002"]
    assert written[-1] == ("periodic", 2) and len(written) == len(set(written))


# -- conversions -----------------------------------------------------------------------------


def test_describe_and_status(start_server):
    h = start_server(mode="sync", replicas=1, reduction="mean", max_staleness=2)
    adam = json.dumps({"class_name": "Adam", "config": {"learning_rate": 0.01}})
    assert h.create(optimizer_json=adam).created
    h.push(grads_for(), worker_id="alice", sequence=3)
    d = h.stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
    assert d.model_name == "m" and d.version == 1
    assert [(v.name, list(v.shape), v.dtype) for v in d.variables] == [
        ("w", [2, 3], tpb.FLOAT32),
        ("b", [2], tpb.FLOAT32),
    ]
    assert json.loads(d.optimizer_json)["class_name"] == "Adam"
    assert d.hyperparameters["learning_rate"] == pytest.approx(0.01)
    assert (d.aggregation.mode, d.aggregation.reduction) == ("sync", "mean")
    assert d.aggregation.max_staleness == 2
    _, state = h.pull(scope=pb.PULL_SCOPE_OPTIMIZER_STATE)
    assert [v.name for v in d.optimizer_variables] == list(state)
    s = h.stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S)
    assert s.has_model and s.serving and s.version == 1 and s.device == "cpu"
    assert s.server_version and s.uptime_s > 0 and s.rounds_completed == 1
    assert [(w.worker_id, w.last_sequence, w.pushes) for w in s.workers] == [("alice", 3, 1)]


def test_pull_rows_and_names(harness):
    version, values = harness.pull(names=["b"], rows=[pb.RowSelection(name="w", rows=[1, 1, 0])])
    assert version == 0 and list(values) == ["b", "w"]
    np.testing.assert_array_equal(values["b"], initial_variables()["b"])
    rows = values["w"]
    assert isinstance(rows, wire.SparseRows)
    np.testing.assert_array_equal(rows.indices, [1, 1, 0])
    np.testing.assert_array_equal(rows.values, initial_variables()["w"][[1, 1, 0]])


def test_optimizer_state_round_trip(harness):
    version, state = harness.pull(scope=pb.PULL_SCOPE_OPTIMIZER_STATE)
    headers = [wire.header_for(n, v) for n, v in state.items()]
    items = [tpb.TensorStreamItem(header=tpb.TensorStreamHeader(tensors=headers, version=version))]
    items += [tpb.TensorStreamItem(chunk=c) for c in chunk_messages(list(state.values()))]
    items.append(tpb.TensorStreamItem(end=tpb.StreamEnd()))
    harness.push(grads_for())
    assert harness.stub.SetOptimizerState(iter(items), timeout=TIMEOUT_S).version == 0
    assert harness.pull(scope=pb.PULL_SCOPE_OPTIMIZER_STATE)[0] == 0


def test_set_hyperparameters(harness):
    request = pb.SetHyperparametersRequest(values={"learning_rate": 0.25})
    response = harness.stub.SetHyperparameters(request, timeout=TIMEOUT_S)
    assert response.hyperparameters["learning_rate"] == 0.25
    assert json.loads(response.optimizer_json)["config"]["learning_rate"] == 0.25


def test_snapshot_create_restore_download_upload(start_server, tmp_path):
    h = start_server(checkpoint_dir=tmp_path / "a")
    h.create()
    h.push(grads_for())
    at_v1 = h.state()
    info = h.stub.CreateSnapshot(pb.CreateSnapshotRequest(), timeout=TIMEOUT_S)
    assert info.version == 1 and info.size_bytes > 0 and info.created_at.endswith("Z")
    h.push(grads_for(), sequence=2)
    listed = h.stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=TIMEOUT_S).snapshots
    assert [s.id for s in listed] == [info.id]
    restored = h.stub.RestoreSnapshot(pb.RestoreSnapshotRequest(id=info.id), timeout=TIMEOUT_S)
    assert restored.snapshot.id == info.id
    h.assert_unchanged(at_v1)
    chunks = list(
        h.stub.DownloadSnapshot(pb.DownloadSnapshotRequest(id=info.id), timeout=TIMEOUT_S)
    )
    data = b"".join(c.data for c in chunks)
    assert data == (tmp_path / "a" / f"{info.id}.safetensors").read_bytes()
    assert chunks[0].total_size == len(data)

    other = start_server(checkpoint_dir=tmp_path / "b")
    header = pb.UploadSnapshotRequest(
        header=pb.UploadSnapshotHeader(size_bytes=len(data), restore=True)
    )
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    items = [header] + [
        pb.UploadSnapshotRequest(chunk=pb.FileChunk(offset=i * 1000, data=p))
        for i, p in enumerate(pieces)
    ]
    items.append(pb.UploadSnapshotRequest(end=tpb.StreamEnd()))
    uploaded = other.stub.UploadSnapshot(iter(items), timeout=TIMEOUT_S)
    assert uploaded.restored and uploaded.snapshot.version == 1
    other.assert_unchanged(at_v1)


# -- admin commands (through the SDK) --------------------------------------------------------


def test_cli_admin_commands(start_server, tmp_path, capsys):
    h = start_server(checkpoint_dir=tmp_path / "ckpt")
    h.create()
    h.push(grads_for())
    address = ["--address", h.server.address, "--timeout-s", "20"]
    assert cli.main(["status", *address]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["version"] == 1 and status["has_model"] is True
    assert cli.main(["snapshot", *address]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    assert snapshot["version"] == 1
    h.push(grads_for(), sequence=2)
    assert cli.main(["snapshots", *address]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)] == [snapshot["id"]]
    assert cli.main(["restore", snapshot["id"], *address]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == snapshot["id"]
    assert h.state()[0] == 1
    assert cli.main(["restore", "snap-000000000009-20260101T000000000000Z", *address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
