"""Bearer tokens: every RPC classified, roles enforced, tokens from env and file, never in ps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from paramserve.client import Client, PermissionDeniedError, UnauthenticatedError
from paramserve.server import auth, cli
from paramserve.server.app import create_server
from paramserve.server.config import ConfigError, ServerConfig, load_config
from paramserve.v1 import parameter_server_pb2 as pb
from tests.support.credentials import (
    ADMIN_TOKEN,
    OTHER_WORKER_TOKEN,
    WORKER_TOKEN,
    write_tokens_file,
)
from tests.support.processes import free_port as _free_port
from tests.support.wire import TIMEOUT_S

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"]
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

# The classification this suite pins down: a new RPC fails the test until it is listed here.
ROLE_OF_METHOD = {
    "Push": "worker",
    "Pull": "worker",
    "Step": "worker",
    "GetStatus": "worker",
    "Describe": "worker",  # read-only; the SDK needs it for shapes and optimizer slots
    "CommitRound": "worker",  # a sharded sync job's push, phases 2 and 3
    "ApplyRound": "worker",
    "HoldUpdates": "admin",  # a sharded snapshot's cut
    "CreateModel": "admin",
    "DeleteModel": "admin",
    "SetOptimizerState": "admin",
    "SetHyperparameters": "admin",
    "CreateSnapshot": "admin",
    "ListSnapshots": "admin",
    "RestoreSnapshot": "admin",
    "DownloadSnapshot": "admin",
    "UploadSnapshot": "admin",
}
CREDENTIALS = {
    "none": None,
    "unknown": "Bearer not-a-configured-token",
    "malformed": f"Basic {ADMIN_TOKEN}",
    "worker": f"Bearer {WORKER_TOKEN}",
    "admin": f"Bearer {ADMIN_TOKEN}",
}


def raw_call(channel: grpc.Channel, method: str, authorization: str | None) -> grpc.StatusCode:
    """Call ``method`` with an empty request message; the status code it ends with."""
    desc = SERVICE.methods_by_name[method]
    request = message_factory.GetMessageClass(desc.input_type)()
    path = f"/{SERVICE.full_name}/{method}"
    serialize = type(request).SerializeToString
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[desc.client_streaming, desc.server_streaming]
    call = factory(path, request_serializer=serialize, response_deserializer=None)
    metadata = [] if authorization is None else [("authorization", authorization)]
    argument = iter([request]) if desc.client_streaming else request
    try:
        result = call(argument, timeout=TIMEOUT_S, metadata=metadata)
        if desc.server_streaming:
            list(result)
    except grpc.RpcError as err:
        raw_call.last_details = err.details()
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """An async server with a model, snapshots on, and a tokens file (shared by the table)."""
    directory = tmp_path_factory.mktemp("auth")
    tokens = write_tokens_file(directory / "tokens.toml")
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        grace_s=0.5,
        tokens_file=tokens,
        checkpoint_dir=directory / "ckpt",
    ).replace(mode="async")
    server = create_server(config)
    with Client(server.address, token=ADMIN_TOKEN, wait_for_ready=False) as admin:
        admin.create_model({"w": np.zeros(4, np.float32)}, optimizer="sgd")
    channel = grpc.insecure_channel(server.address)
    yield server, channel
    channel.close()
    server.stop(0)


def test_every_rpc_is_classified():
    assert set(ROLE_OF_METHOD) == {m.name for m in SERVICE.methods}
    for method, role in ROLE_OF_METHOD.items():
        assert auth.required_role(f"/{SERVICE.full_name}/{method}") == role, method
    assert {m for m, r in ROLE_OF_METHOD.items() if r == "worker"} == auth.WORKER_METHODS
    # Anything else (another service, an unknown method) needs an admin token.
    assert auth.required_role(f"/{SERVICE.full_name}/NotYetClassified") == "admin"
    assert auth.required_role("/some.Other/Method") == "admin"
    assert auth.required_role("/grpc.health.v1.Health/Check") is None


@pytest.mark.parametrize("credential", list(CREDENTIALS))
@pytest.mark.parametrize("method", sorted(ROLE_OF_METHOD))
def test_role_table(auth_server, method, credential):
    _, channel = auth_server
    code = raw_call(channel, method, CREDENTIALS[credential])
    if credential in ("none", "unknown", "malformed"):
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in raw_call.last_details
    elif credential == "worker" and ROLE_OF_METHOD[method] == "admin":
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert f"{method} needs an admin token" in raw_call.last_details
    else:
        # Allowed: whatever the empty request earns (OK, INVALID_ARGUMENT, NOT_FOUND, ...).
        assert code not in DENIED, (code, getattr(raw_call, "last_details", ""))


def test_worker_token_cannot_change_the_model(start_server, tmp_path):
    server = start_server(tokens_file=write_tokens_file(tmp_path / "t.toml"))
    with Client(server.address, token=ADMIN_TOKEN, wait_for_ready=False) as admin:
        admin.create_model({"w": np.arange(4, dtype=np.float32)}, optimizer="sgd")
    with Client(server.address, token=WORKER_TOKEN, wait_for_ready=False) as worker:
        before = worker.pull()
        with pytest.raises(PermissionDeniedError, match="admin token"):
            worker.delete_model()
        with pytest.raises(PermissionDeniedError):
            worker.set_hyperparameters(learning_rate=10.0)
        with pytest.raises(PermissionDeniedError):
            worker.create_model({"x": np.zeros(1, np.float32)}, optimizer="sgd")
        after = worker.pull()
        assert after.version == before.version
        np.testing.assert_array_equal(after["w"], before["w"])
        assert worker.describe().spec("w") is not None


def test_health_and_reflection_are_open(auth_server):
    _, channel = auth_server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE.full_name):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = reflection.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S)
    assert SERVICE.full_name in {s.name for s in reply.list_services_response.service}


def test_refusals_are_counted_in_metrics(start_server, tmp_path):
    server = start_server(tokens_file=write_tokens_file(tmp_path / "t.toml"))
    with (
        Client(server.address, wait_for_ready=False) as anonymous,
        pytest.raises(UnauthenticatedError),
    ):
        anonymous.status()
    counter = server.core.metrics.rpcs.labels(method="GetStatus", code="UNAUTHENTICATED")
    assert counter._value.get() == 1


def test_tokens_from_the_environment(start_server, monkeypatch):
    env = {
        "PARAMSERVE_ADMIN_TOKEN": f"{ADMIN_TOKEN}, second-admin-token",
        "PARAMSERVE_WORKER_TOKEN": WORKER_TOKEN,
    }
    config = load_config(env=env, overrides={"port": 0, "mode": "async"})
    assert config.admin_tokens == (ADMIN_TOKEN, "second-admin-token")
    assert ADMIN_TOKEN not in repr(config) and WORKER_TOKEN not in repr(config)
    server = start_server(**{k: getattr(config, k) for k in ("admin_tokens", "worker_tokens")})
    with Client(server.address, token="second-admin-token", wait_for_ready=False) as admin:
        admin.create_model({"w": np.zeros(2, np.float32)}, optimizer="sgd")
    # The SDK reads $PARAMSERVE_TOKEN when no token is given.
    monkeypatch.setenv("PARAMSERVE_TOKEN", WORKER_TOKEN)
    with Client(server.address, wait_for_ready=False) as worker:
        assert worker.push({"w": np.ones(2, np.float32)}).version == 1
        with pytest.raises(PermissionDeniedError):
            worker.snapshot()
    monkeypatch.setenv("PARAMSERVE_TOKEN", "stale-token")
    with Client(server.address, wait_for_ready=False) as stale, pytest.raises(UnauthenticatedError):
        stale.pull()


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_tokens_from_a_file(start_server, tmp_path, fmt):
    path = write_tokens_file(tmp_path / f"tokens.{fmt}", fmt=fmt)
    server = start_server(tokens_file=path)
    with Client(server.address, token=ADMIN_TOKEN, wait_for_ready=False) as admin:
        admin.create_model({"w": np.zeros(2, np.float32)}, optimizer="sgd")
    for token in (WORKER_TOKEN, OTHER_WORKER_TOKEN):
        with Client(server.address, token=token, wait_for_ready=False) as worker:
            worker.push({"w": np.ones(2, np.float32)})
    with Client(server.address, token=ADMIN_TOKEN, wait_for_ready=False) as admin:
        assert admin.status().version == 2


def test_tokens_file_must_be_private(start_server, tmp_path):
    path = write_tokens_file(tmp_path / "tokens.toml", mode=0o644)
    with pytest.raises(ConfigError, match=r"accessible to other users.*chmod 600"):
        start_server(tokens_file=path)
    path.chmod(0o640)  # group-readable is allowed (a service group)
    start_server(tokens_file=path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "holds no tokens"),
        ('admin = []\nworker = ""\n', "non-empty"),
        ('root = ["x"]\n', "unknown role"),
        ('admin = ["has space"]\n', "without whitespace"),
        ('admin = ["same"]\nworker = ["same"]\n', "both admin and worker"),
        ("admin = [1]\n", "must be a token or a list"),
        (f'admin = ["{ADMIN_TOKEN}"\n', "parse error near line"),
    ],
)
def test_bad_tokens_files_are_refused(tmp_path, text, match):
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=match) as info:
        auth.load_tokens_file(path)
    assert ADMIN_TOKEN not in str(info.value)


def test_tokens_never_come_from_flags_or_the_config_file(tmp_path):
    parser = cli.build_parser()
    for flag in ("--token", "--admin-token", "--worker-token", "--tokens"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", flag, "x"])
    toml = tmp_path / "c.toml"
    toml.write_text(f'admin_tokens = ["{ADMIN_TOKEN}"]\n')
    with pytest.raises(ConfigError, match="do not belong in the config file"):
        load_config(config_file=toml, env={})
    args = parser.parse_args(["serve", "--tokens-file", str(tmp_path / "t.toml")])
    assert cli.config_from_args(args, env={}).tokens_file == tmp_path / "t.toml"


def test_tokens_repr_hides_the_tokens():
    tokens = auth.Tokens(admin=(ADMIN_TOKEN,), worker=(WORKER_TOKEN,))
    assert ADMIN_TOKEN not in repr(tokens) and WORKER_TOKEN not in repr(tokens)


def test_tokens_are_not_in_ps_or_the_logs(tmp_path):
    """A real `python -m paramserve.server serve --tokens-file`: /proc/<pid>/cmdline and the
    log lines (including those of refused calls) never contain a token."""
    tokens = write_tokens_file(tmp_path / "tokens.toml")
    port = _free_port()
    command = [sys.executable, "-m", "paramserve.server", "serve", "--port", str(port)]
    command += ["--mode", "async", "--tokens-file", str(tokens), "--log-format", "json"]
    command += ["--log-level", "debug"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVE_")}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines: list[str] = []
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not any("listening on" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "--tokens-file" in cmdline
        for token in (ADMIN_TOKEN, WORKER_TOKEN, OTHER_WORKER_TOKEN):
            assert token not in cmdline
        with Client(address, token=ADMIN_TOKEN, wait_for_ready=False) as admin:
            admin.create_model({"w": np.zeros(2, np.float32)}, optimizer="sgd")
        with Client(address, token=WORKER_TOKEN, wait_for_ready=False) as worker:
            worker.push({"w": np.ones(2, np.float32)})
            with pytest.raises(PermissionDeniedError):
                worker.delete_model()
        with (
            Client(address, token="bogus-presented-secret", wait_for_ready=False) as bogus,
            pytest.raises(UnauthenticatedError, match="bearer token"),
        ):
            bogus.pull()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        drain.join(10)
    text = "".join(lines)
    messages = [json.loads(line)["message"] for line in lines if line.startswith("{")]
    refusals = [m for m in messages if m.startswith("refused ")]
    assert {m.rsplit(": ", 1)[1] for m in refusals} == {"PERMISSION_DENIED", "UNAUTHENTICATED"}
    for secret in (ADMIN_TOKEN, WORKER_TOKEN, OTHER_WORKER_TOKEN, "bogus-presented-secret"):
        assert secret not in text
    assert re.search(r"refused DeleteModel from \S+: PERMISSION_DENIED", text)
