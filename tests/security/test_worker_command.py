"""`paramserve worker` against a `paramserve serve` daemon with TLS and tokens: an admin
creates the model, workers holding worker tokens join it; refusals end with a message."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from paramserve.client import Client
from paramserve.server import demo
from tests.support.credentials import ADMIN_TOKEN, OTHER_WORKER_TOKEN, WORKER_TOKEN, Pki
from tests.support.credentials import write_tokens_file as write_server_tokens
from tests.support.processes import clean_env

# Generous bound on a worker run: only a hang runs into it.
RUN_TIMEOUT_S = 240.0

Worker = Callable[..., subprocess.Popen]


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    path.chmod(mode)
    return path


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    """``worker(*flags, token=None)``: a `paramserve worker` process (stdout and stderr
    piped, ``$PARAMSERVE_TOKEN`` set to ``token`` if given); killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(*flags: str | Path, token: str | None = None) -> subprocess.Popen:
        env = clean_env(**({"PARAMSERVE_TOKEN": token} if token is not None else {}))
        proc = subprocess.Popen(
            [sys.executable, "-m", "paramserve.server", "worker", *map(str, flags)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    return proc.returncode, out, err


def _secured_server(start_process, pki: Pki, tmp_path: Path, *flags: str, mutual: bool = False):
    tokens = write_server_tokens(tmp_path / "tokens.toml")
    mtls = ["--tls-client-ca", str(pki.ca)] if mutual else []
    return start_process(
        "--tls-cert", pki.server_cert, "--tls-key", pki.server_key, *mtls,
        "--tokens-file", tokens, *flags,
    )  # fmt: skip


def test_admin_creates_the_model_then_worker_tokens_train_over_mtls(
    start_process, worker, pki, tmp_path
):
    server = _secured_server(
        start_process, pki, tmp_path, "--mode", "sync", "--replicas", "2", mutual=True
    )
    tls = ["--address", server.address, "--tls-ca", pki.ca]
    tls += ["--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
    admin_file = _secret(tmp_path / "admin.token", ADMIN_TOKEN)
    code, out, err = _finish(worker(*tls, "--steps", "0", "--token-file", admin_file))
    assert code == 0, err
    assert "model created" in out

    steps = 3
    worker_file = _secret(tmp_path / "worker.token", WORKER_TOKEN)
    common = [*tls, "--workers", "2", "--steps", str(steps)]
    workers = [
        worker(*common, "--rank", "0", "--token-file", worker_file),
        worker(*common, "--rank", "1", token=OTHER_WORKER_TOKEN),  # from $PARAMSERVE_TOKEN
    ]
    for proc in workers:
        code, out, err = _finish(proc)
        assert code == 0, err
        assert "model already there" in out
        assert f"done after {steps} steps at version {steps}:" in out, out
    # Neither worker asked to create the model: no refusal in the server's log.
    assert not [e for e in server.events if e.get("event") == "auth_refused"]


def test_worker_token_without_a_model_is_told_an_admin_must_create_it(
    start_process, worker, pki, tmp_path
):
    server = _secured_server(start_process, pki, tmp_path)
    proc = worker("--address", server.address, "--tls-ca", pki.ca, token=WORKER_TOKEN)
    code, _, err = _finish(proc)
    assert code == 1
    assert "has no model" in err and "admin-only" in err, err
    assert "--wait-for-model-s" in err
    assert "Traceback" not in err


def test_worker_token_waits_for_the_admin_to_create_the_model(start_process, worker, pki, tmp_path):
    server = _secured_server(start_process, pki, tmp_path, "--mode", "async")
    proc = worker(
        "--address", server.address, "--tls-ca", pki.ca, "--steps", "2",
        "--wait-for-model-s", str(RUN_TIMEOUT_S), token=WORKER_TOKEN,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # ends if the worker exits first
        seen.append(line)
        if "waiting up to" in line:
            break
    assert seen and "for an admin to create it" in seen[-1], (seen, proc.stderr.read())

    with Client(server.address, tls_ca=pki.ca, token=ADMIN_TOKEN, timeout_s=60.0) as admin:
        admin.create_model(demo.init_params(0), {"class_name": "adam", "config": {}})
    code, out, err = _finish(proc)
    assert code == 0, err
    assert "model already there" in out
    assert "done after 2 steps at version 2:" in out, out


@pytest.mark.parametrize("token", [None, "not-a-token-of-this-server"])
def test_missing_or_unknown_token_is_refused_with_the_cause(
    start_process, worker, pki, tmp_path, token
):
    server = _secured_server(start_process, pki, tmp_path)
    code, _, err = _finish(worker("--address", server.address, "--tls-ca", pki.ca, token=token))
    assert code == 1
    assert "UNAUTHENTICATED" in err and "needs a valid bearer token" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("trust", "hint"),
    [("plaintext", "needs --tls-ca"), ("another CA", "check that --tls-ca is the CA")],
)
def test_worker_that_cannot_reach_the_tls_server_says_why(
    start_process, worker, pki, tmp_path, trust, hint
):
    server = _secured_server(start_process, pki, tmp_path)
    flags = [] if trust == "plaintext" else ["--tls-ca", pki.other_ca]
    proc = worker("--address", server.address, "--timeout-s", "5", *flags, token=WORKER_TOKEN)
    code, _, err = _finish(proc)
    assert code == 1
    assert "no answer from a server" in err and hint in err, err
    assert "Traceback" not in err


def test_worker_refuses_unusable_credential_files(worker, tmp_path):
    # No server: these end before connecting, with exit status 2.
    exposed = _secret(tmp_path / "exposed.token", WORKER_TOKEN, mode=0o644)
    empty = _secret(tmp_path / "empty.token", "")
    cert = tmp_path / "client.pem"
    cases = {
        ("--token-file", str(exposed)): "chmod 600",
        ("--token-file", str(empty)): "non-empty",
        ("--token-file", str(tmp_path / "missing")): "cannot read",
        ("--tls-cert", str(cert)): "--tls-cert and --tls-key go together",
    }
    for flags, expected in cases.items():
        code, _, err = _finish(worker("--address", "127.0.0.1:1", *flags))
        assert code == 2, (flags, err)
        assert expected in err and "Traceback" not in err, (flags, err)
        assert WORKER_TOKEN not in err


def test_worker_without_tokens_creates_the_model_and_refuses_another_one(
    start_server, connect, worker
):
    # No tokens: the first worker creates the demo's model; a server holding another model
    # is refused with a message instead of trained.
    server = start_server()
    code, out, err = _finish(worker("--address", server.address, "--steps", "1"))
    assert code == 0, err
    assert "model created" in out and "done after 1 steps" in out, out
    other = start_server()
    connect(other).create_model({"w": np.ones(3, np.float32)}, optimizer="sgd")
    code, _, err = _finish(worker("--address", other.address, "--steps", "1"))
    assert code == 1
    assert "is not the demo's MLP" in err and "Traceback" not in err, err
