"""The admin commands and the help: what `restore` says, one line for a failure (no
traceback), every default of `serve` and a description for every subcommand."""

from __future__ import annotations

import argparse
import json

import pytest

from paramserve.server import cli
from tests.support.models.tiny import grads_for
from tests.support.processes import free_port


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_restore_says_what_it_restored_and_the_version(start_server, tmp_path, capsys) -> None:
    server = start_server(checkpoint_dir=tmp_path / "ckpt")
    server.create()
    server.push(grads_for())
    address = ["--address", server.address, "--timeout-s", "60"]
    assert cli.main(["snapshot", *address]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    server.push(grads_for(), sequence=2, base_version=1)
    assert server.state()[0] == 2

    assert cli.main(["restore", snapshot["id"], *address]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == snapshot  # for scripts: id, version, size, time
    assert one_line(err) == (f"restored snapshot {snapshot['id']}: the model is back at version 1")
    assert server.state()[0] == 1


def test_an_unreachable_server_is_one_line(capsys) -> None:
    address = f"127.0.0.1:{free_port()}"
    for command in (["status"], ["snapshot"], ["snapshots"], ["restore", "snap-x"]):
        assert cli.main([*command, "--address", address, "--timeout-s", "5"]) == 1
        # The SDK's message (its wording is the SDK's), on one line after the command's name.
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"paramserve {command[0]}: ") and len(line) > 40, line


def test_a_refused_call_is_one_line(start_server, capsys) -> None:
    server = start_server()  # no checkpoint directory: no snapshots
    assert cli.main(["snapshot", "--address", server.address, "--timeout-s", "60"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("paramserve snapshot: ") and "FAILED_PRECONDITION" in line, line


def test_bad_admin_arguments_are_one_line(tmp_path, capsys) -> None:
    address = ["--address", f"127.0.0.1:{free_port()}"]
    assert cli.main(["status", *address, "--timeout-s", "-1"]) == 1
    assert "timeout_s must be > 0" in one_line(capsys.readouterr().err)
    assert cli.main(["status", *address, "--tls-ca", str(tmp_path / "ca.pem")]) == 1
    assert "cannot read the CA certificate" in one_line(capsys.readouterr().err)
    assert cli.main(["status", *address, "--token-file", str(tmp_path / "token")]) == 2
    assert "cannot read" in one_line(capsys.readouterr().err)


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere


def test_serve_help_shows_the_defaults(capsys) -> None:
    text = _help(capsys, "serve")
    for expected in (
        "--mode {sync,async,stale} aggregation mode (default: sync)",
        "workers per synchronous round (default: 1)",
        "at shutdown (default: 10)",
        "(default: sum)",
        "abort it (default: partial)",
        "(auto: a GPU if usable) (default: cpu)",
        "may take (default: 30)",
        "a name or Keras JSON (default: adam)",
        "port to listen on; 0 picks a free one (default: 50051)",
        "one gRPC message (default: 64MiB)",
        "final snapshot at shutdown (default: on)",
        "(default: reject)",
    ):
        assert expected in text


def test_every_serve_flag_has_its_default_in_the_help() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    flags = [a for a in serve._actions if a.dest not in ("help", "config")]
    assert len(flags) > 30
    for action in flags:
        assert "default" in (action.help or ""), action.option_strings


def test_every_subcommand_has_a_description(capsys) -> None:
    text = _help(capsys)
    for name, description in cli.SUBCOMMANDS.items():
        assert f"{name} {description}" in text
    for name in ("serve", "status", "snapshot", "snapshots", "restore"):
        assert cli.SUBCOMMANDS[name] in _help(capsys, name)


def test_token_file_help_does_not_ask_for_an_admin_token(capsys) -> None:
    text = _help(capsys, "status")
    assert "file holding an admin token" not in text
    assert "file holding a worker's or an admin's token" in text
    assert "(default: $PARAMSERVE_TOKEN" in text
    assert "file holding an admin's token" in _help(capsys, "snapshot")
