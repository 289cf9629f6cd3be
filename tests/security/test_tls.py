"""TLS and mutual TLS from certificate files, through the SDK and the admin CLI."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from paramserve.client import Client, UnavailableError
from paramserve.client.channel import tls_credentials
from paramserve.server import cli
from paramserve.server.config import ConfigError, ServerConfig
from tests.support.credentials import ADMIN_TOKEN, write_tokens_file

FAST_FAIL = {"timeout_s": 5.0, "wait_for_ready": False, "retry_max_attempts": 2}


def _tls_server(start_server, pki, *, mutual: bool = False, **changes):
    return start_server(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca if mutual else None,
        **changes,
    )


def test_sdk_with_the_ca_trains_over_tls(start_server, pki):
    server = _tls_server(start_server, pki)
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        with Client(f"{host}:{server.port}", tls_ca=pki.ca, **FAST_FAIL) as client:
            if host == "127.0.0.1":
                client.create_model({"w": np.ones(3, np.float32)}, optimizer="sgd")
            client.push({"w": np.ones(3, np.float32)})
            weights = client.pull()
            assert weights.version >= 1
            assert weights["w"].shape == (3,)


def test_sdk_without_tls_is_refused(start_server, pki):
    server = _tls_server(start_server, pki)
    with Client(server.address, **FAST_FAIL) as client, pytest.raises(UnavailableError):
        client.status()


def test_sdk_trusting_only_system_roots_is_refused(start_server, pki):
    server = _tls_server(start_server, pki)
    creds = grpc.ssl_channel_credentials()
    with (
        Client(server.address, credentials=creds, **FAST_FAIL) as client,
        pytest.raises(UnavailableError),
    ):
        client.status()


def test_sdk_with_the_wrong_ca_is_refused(start_server, pki):
    server = _tls_server(start_server, pki)
    with (
        Client(server.address, tls_ca=pki.other_ca, **FAST_FAIL) as client,
        pytest.raises(UnavailableError),
    ):
        client.status()


def test_mtls_client_without_certificate_is_refused(start_server, pki):
    server = _tls_server(start_server, pki, mutual=True)
    with (
        Client(server.address, tls_ca=pki.ca, **FAST_FAIL) as client,
        pytest.raises(UnavailableError),
    ):
        client.status()


def test_mtls_client_with_certificate_works(start_server, pki):
    server = _tls_server(start_server, pki, mutual=True)
    with Client(
        server.address,
        tls_ca=pki.ca,
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
        **FAST_FAIL,
    ) as client:
        assert client.status().version == 0


def test_mtls_client_certificate_from_another_ca_is_refused(start_server, pki):
    server = _tls_server(start_server, pki, mutual=True)
    with (
        Client(
            server.address,
            tls_ca=pki.ca,
            tls_cert=pki.other_client_cert,
            tls_key=pki.other_client_key,
            **FAST_FAIL,
        ) as client,
        pytest.raises(UnavailableError),
    ):
        client.status()


def test_cli_admin_over_mtls_with_a_token_file(start_server, pki, tmp_path, capsys):
    tokens = write_tokens_file(tmp_path / "tokens.toml")
    server = _tls_server(
        start_server, pki, mutual=True, tokens_file=tokens, checkpoint_dir=tmp_path / "ckpt"
    )
    with Client(
        server.address,
        tls_ca=pki.ca,
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
        token=ADMIN_TOKEN,
        **FAST_FAIL,
    ) as admin:
        admin.create_model({"w": np.zeros(2, np.float32)}, optimizer="sgd")
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    flags = ["--address", server.address, "--timeout-s", "10", "--tls-ca", str(pki.ca)]
    flags += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert cli.main(["snapshot", *flags, "--token-file", str(token_file)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 0
    # The same command without the token: UNAUTHENTICATED, reported without a traceback.
    assert cli.main(["snapshots", *flags]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    # Without a client certificate the handshake itself fails.
    assert cli.main(["status", "--address", server.address, "--tls-ca", str(pki.ca)]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_tls_settings_are_checked(pki, tmp_path, start_server):
    with pytest.raises(ConfigError, match="tls_cert` and `tls_key"):
        ServerConfig(tls_cert=pki.server_cert)
    with pytest.raises(ConfigError, match="tls_client_ca"):
        ServerConfig(tls_client_ca=pki.ca)
    with pytest.raises(ConfigError, match="cannot read the TLS certificate"):
        start_server(tls_cert=tmp_path / "missing.pem", tls_key=pki.server_key)
    with pytest.raises(ValueError, match="together"):
        tls_credentials(ca=pki.ca, cert=pki.client_cert)
    with pytest.raises(ValueError, match="either credentials or tls_"):
        Client("127.0.0.1:1", credentials=grpc.ssl_channel_credentials(), tls_ca=pki.ca)


def test_tls_flags_reach_the_config(pki):
    args = ["serve", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    args += ["--tls-client-ca", str(pki.ca)]
    config = cli.config_from_args(cli.build_parser().parse_args(args), env={})
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (
        pki.server_cert,
        pki.server_key,
        pki.ca,
    )
