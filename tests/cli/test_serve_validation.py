"""`paramserve serve` refuses a bad setting before it starts: exit status 2 and one line on
stderr naming the setting and the cause, whether the value came from a flag, a
PARAMSERVE_* variable or the TOML file."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest

from paramserve.server import cli
from paramserve.server.config import load_config


@pytest.fixture(autouse=True)
def _no_paramserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PARAMSERVE_"):
            monkeypatch.delenv(name)


def refused(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """Run ``serve FLAGS`` (which must not start); its one stderr line."""
    assert cli.main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("paramserve serve: configuration error: ")
    return lines[0]


# (setting, TOML value, the same as a flag or environment value, what the message says)
BAD = [
    ("optimizer", '"adma"', "adma", r"Known optimizers: \[.*'adam'.*'sgd'\]"),
    (
        "optimizer",
        json.dumps('{"class_name": "Adam", "config": {"bogus": 1}}'),
        '{"class_name": "Adam", "config": {"bogus": 1}}',
        r"`optimizer`: .*not recognized: \{'bogus': 1\}",
    ),
    ("optimizer", '"{not json"', "{not json", r"`optimizer`: .*not valid JSON"),
    ("replicas", "-1", "-1", r"`replicas` must be >= 1. Received: replicas=-1"),
    ("replicas", "0", "0", r"`replicas` must be >= 1"),
    ("grace_s", "-1.0", "-1", r"`grace_s` must be >= 0"),
    ("grace_s", "nan", "nan", r"`grace_s` must be a finite number"),
    ("round_timeout_s", "0", "0", r"`round_timeout_s` must be > 0"),
    ("round_timeout_s", "inf", "inf", r"`round_timeout_s` must be a finite number"),
    ("max_staleness", "-2", "-2", r"`max_staleness` must be >= 0"),
    ("max_workers", "1", "1", r"`max_workers` must be >= 2"),
    ("apply_threads", "-1", "-1", r"`apply_threads` must be >= 0"),
    ("port", "70000", "70000", r"`port` must be in \[0, 65535\]"),
    ("metrics_port", "-1", "-1", r"`metrics_port` must be in \[0, 65535\]"),
    ("max_message_bytes", '"1KiB"', "1KiB", r"`max_message_bytes` must be >= 65536"),
    ("mode", '"synch"', "synch", r"`mode` must be one of \['sync', 'async', 'stale'\]"),
    ("device", '"gpx"', "gpx", r"`device` must be one of \['auto', 'cpu', 'gpu'\]"),
    ("keep_snapshots", "3", "3", r"`keep_snapshots` needs a `checkpoint_dir`"),
]


def _id(case: tuple[str, str, str, str]) -> str:
    return f"{case[0]}={case[2]}"


# As flags, mode and device are argparse choices: test_flag_choices_are_refused_by_argparse.
@pytest.mark.parametrize("case", [c for c in BAD if c[0] not in ("mode", "device")], ids=_id)
def test_a_bad_flag_is_refused(case, capsys) -> None:
    name, _toml, text, message = case
    assert re.search(message, refused(capsys, "--" + name.replace("_", "-"), text))


@pytest.mark.parametrize("case", BAD, ids=_id)
def test_a_bad_environment_variable_is_refused(case, capsys, monkeypatch) -> None:
    name, _toml, text, message = case
    monkeypatch.setenv("PARAMSERVE_" + name.upper(), text)
    line = _refused_without_port(capsys, []) if name == "port" else refused(capsys)
    assert re.search(message, line)


@pytest.mark.parametrize("case", BAD, ids=_id)
def test_a_bad_toml_value_is_refused(case, capsys, tmp_path) -> None:
    name, toml, _text, message = case
    path = tmp_path / "paramserve.toml"
    path.write_text(f"{name} = {toml}\n")
    if name == "port":
        line = _refused_without_port(capsys, ["--config", str(path)])
    else:
        line = refused(capsys, "--config", str(path))
    assert re.search(message, line)


def _refused_without_port(capsys: pytest.CaptureFixture[str], flags: list[str]) -> str:
    assert cli.main(["serve", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_flag_choices_are_refused_by_argparse(capsys) -> None:
    for flags in (["--mode", "synch"], ["--device", "gpx"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["serve", *flags])
        assert info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_replicas_beyond_the_rpc_threads_are_refused(capsys) -> None:
    line = refused(capsys, "--replicas", "8", "--max-workers", "4")
    assert "`replicas` (8) must not exceed `max_workers` (4)" in line
    # Async and stale modes hold no thread per waiting worker.
    overrides = {"replicas": 8, "max_workers": 4, "mode": "async"}
    assert load_config(env={}, overrides=overrides).aggregation.replicas == 8


def test_apply_threads_auto_leaves_two_cores_and_stops_at_four() -> None:
    from paramserve.server.config import apply_threads_for

    assert [apply_threads_for(0, cores) for cores in (1, 2, 3, 4, 5, 6, 16)] == [
        1, 1, 1, 2, 3, 4, 4,
    ]  # fmt: skip
    assert apply_threads_for(3, 2) == 3  # a number is taken as it is
    assert load_config(env={"PARAMSERVE_APPLY_THREADS": "2"}).apply_threads == 2
    assert load_config(env={}).apply_threads == 0


def test_missing_tls_and_token_files_are_refused(capsys, tmp_path) -> None:
    line = refused(
        capsys, "--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(tmp_path / "no.key")
    )
    assert "cannot read the TLS" in line and "No such file or directory" in line
    line = refused(capsys, "--tokens-file", str(tmp_path / "tokens.toml"))
    assert f"cannot read {str(tmp_path / 'tokens.toml')!r}" in line
    line = refused(capsys, "--tls-cert", str(tmp_path / "no.pem"))
    assert "`tls_cert` and `tls_key` must be given together" in line


# -- in a real process: the daemon's own checks at start --------------------------------------


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_daemon_refuses_an_unknown_optimizer(procs) -> None:
    code, stderr = procs.refused_server("--optimizer", "adma")
    assert code == 2
    line = one_line(stderr)
    assert "`optimizer`" in line and "Known optimizers" in line and "'adam'" in line


def test_the_daemon_refuses_gpu_without_one(procs) -> None:
    from paramserve import optim_core

    if optim_core.gpu_available():
        pytest.skip("a usable GPU is present")
    code, stderr = procs.refused_server("--device", "gpu")
    assert code == 2
    assert "`device`" in one_line(stderr) and "no usable GPU" in stderr


def test_a_checkpoint_dir_that_is_a_file_is_refused(procs, tmp_path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_text("")
    code, stderr = procs.refused_server("--checkpoint-dir", path)
    assert code == 1
    line = one_line(stderr)
    assert f"cannot use {path} as the checkpoint directory: it is not a directory" in line


def test_a_port_in_use_is_named(procs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = procs.refused_server("--port", str(port))
    assert code == 1
    line = one_line(stderr)
    assert f"127.0.0.1:{port}" in line
    assert "address already in use" in line
    assert "--port" in line


def test_a_metrics_port_in_use_is_named(procs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = procs.refused_server("--metrics-port", str(port))
    assert code == 1
    line = one_line(stderr)
    assert f"/metrics on 127.0.0.1:{port}: address already in use" in line
    assert "--metrics-port" in line
