"""A server the SDK cannot reach: the error names the address and the transport's cause.

Each case uses a real server (or a closed port) and the SDK's defaults. That the failure came
from the fast path, not from a deadline, shows in the error: UNAVAILABLE with the cause, after
one attempt, never a DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
import socket
import threading

import numpy as np
import pytest

from paramserve.client import Client, UnavailableError
from paramserve.server import cli
from tests.support.processes import free_port


@pytest.fixture(autouse=True)
def _no_ambient_wait(monkeypatch) -> None:
    """A wait set in the developer's shell must not change these tests."""
    monkeypatch.delenv("PARAMSERVE_WAIT_FOR_SERVER_S", raising=False)


def closed_port_address() -> str:
    """An address on loopback where nothing listens (a port bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def unreachable(address: str, **options) -> UnavailableError:
    """The error of a first call to ``address`` with the SDK's default waits."""
    with Client(address, **options) as client, pytest.raises(UnavailableError) as caught:
        client.status()
    error = caught.value
    assert error.code.name == "UNAVAILABLE" and isinstance(error, ConnectionError)
    assert error.attempts == 1  # no silent resending: the first failure is the answer
    assert f"cannot reach the paramserve server at {address}: " in error.message
    assert "Deadline" not in error.message
    return error


def _tls_server(start_server, pki, *, mutual: bool = False):
    return start_server(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca if mutual else None,
    )


def test_connection_refused():
    error = unreachable(address := closed_port_address())
    assert "connection refused: nothing listens on that port" in error.message
    assert "--host and --port" in error.message
    assert "wait_for_server_s" in error.message  # how to wait for a server still starting
    assert f"ipv4:{address}: Failed to connect to remote host: Connection refused" in str(error)


def test_unknown_host():
    # .invalid never resolves (RFC 2606).
    error = unreachable("no-such-host.invalid:50051")
    assert "unknown host: its name does not resolve" in error.message


def test_plaintext_client_against_a_tls_server(start_server, pki):
    server = _tls_server(start_server, pki)
    error = unreachable(server.address)
    assert "closed the connection during the handshake: it probably uses TLS" in error.message
    assert "tls_ca" in error.message


def test_tls_client_against_a_plaintext_server(start_server, pki):
    server = start_server()
    error = unreachable(server.address, tls_ca=pki.ca)
    assert "TLS handshake failed: the server does not speak TLS" in error.message
    assert "WRONG_VERSION_NUMBER" in error.message  # gRPC's own words, kept


def test_wrong_ca(start_server, pki):
    server = _tls_server(start_server, pki)
    error = unreachable(server.address, tls_ca=pki.other_ca)
    assert "TLS handshake failed, certificate verify failed" in error.message
    assert "CERTIFICATE_VERIFY_FAILED" in error.message
    assert "wait_for_server_s" not in error.message  # waiting would not help


def test_mutual_tls_without_a_client_certificate(start_server, pki):
    server = _tls_server(start_server, pki, mutual=True)
    error = unreachable(server.address, tls_ca=pki.ca)
    assert "during the TLS handshake: it may require a client certificate" in error.message


def test_the_same_client_works_once_it_is_configured_right(start_server, pki):
    server = _tls_server(start_server, pki, mutual=True)
    with Client(
        server.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    ) as client:
        assert client.status().version == 0


def test_admin_cli_prints_the_cause(capsys):
    address = closed_port_address()
    assert cli.main(["status", "--address", address]) == 1
    err = capsys.readouterr().err
    assert f"paramserve status: UNAVAILABLE: cannot reach the paramserve server at {address}" in err
    assert "connection refused" in err


def test_admin_cli_with_the_wrong_ca(start_server, pki, capsys):
    server = _tls_server(start_server, pki)
    assert cli.main(["status", "--address", server.address, "--tls-ca", str(pki.other_ca)]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the paramserve server at {server.address}" in err
    assert "certificate verify failed" in err


class _FirstWarning(logging.Handler):
    """Sets ``seen`` at the first warning the SDK logs (a connect attempt that failed)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.seen.set()


@pytest.mark.parametrize("first", ["create_model", "upload_snapshot"])
def test_wait_for_server_reaches_a_server_started_later(start_server, connect, tmp_path, first):
    """With ``wait_for_server_s`` the first call waits for a server that is not up yet: here
    one started only after the call has failed to connect at least once. Neither call is
    resent after a failure in transit, but one that never connected is safe to send again
    (the upload reads its file anew)."""
    if first == "upload_snapshot":
        source = start_server(mode="async")
        admin = connect(source)
        admin.create_model({"w": np.ones(3, np.float32)}, "sgd")
        snapshot = tmp_path / "snap.safetensors"
        admin.download_snapshot(admin.snapshot(), snapshot)
    port = free_port()
    address = f"127.0.0.1:{port}"
    logger = logging.getLogger("paramserve.client")
    handler = _FirstWarning()
    logger.addHandler(handler)
    result: dict[str, object] = {}
    client = Client(address, wait_for_server_s=120.0)

    def first_call() -> None:
        try:
            if first == "create_model":
                result["created"] = client.create_model({"w": np.zeros(3, np.float32)}, "sgd")
            else:
                result["uploaded"] = client.upload_snapshot(snapshot, restore=True)
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    caller = threading.Thread(target=first_call)
    try:
        caller.start()
        assert handler.seen.wait(60), "the client never reported a failed connect"
        assert "cannot reach the paramserve server" in handler.messages[0]
        assert "connection refused" in handler.messages[0]
        start_server(port=port, mode="async")
        caller.join(120)
        assert not caller.is_alive()
    finally:
        logger.removeHandler(handler)
        client.close()
    assert "error" not in result, result.get("error")
    if first == "create_model":
        assert result["created"].created
    else:
        assert result["uploaded"].version == 0
        with Client(address) as check:
            np.testing.assert_array_equal(check.pull()["w"], np.ones(3, np.float32))
    assert client.resends >= 1


def test_wait_for_server_must_not_be_negative():
    with pytest.raises(ValueError, match="wait_for_server_s"):
        Client(wait_for_server_s=-1)


def test_wait_for_server_from_the_environment(monkeypatch):
    """``paramserve worker`` and other programs that build their own Client take the wait
    from ``$PARAMSERVE_WAIT_FOR_SERVER_S``; an explicit argument wins."""
    monkeypatch.setenv("PARAMSERVE_WAIT_FOR_SERVER_S", "90")
    with Client(closed_port_address()) as client:
        assert client.wait_for_server_s == 90.0
    with Client(closed_port_address(), wait_for_server_s=0) as client:
        assert client.wait_for_server_s == 0.0
        with pytest.raises(UnavailableError, match="connection refused"):
            client.status()
    monkeypatch.setenv("PARAMSERVE_WAIT_FOR_SERVER_S", "soon")
    with pytest.raises(ValueError, match="PARAMSERVE_WAIT_FOR_SERVER_S"):
        Client(closed_port_address())
