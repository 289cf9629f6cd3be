"""The README's `openssl` recipe (a test CA, a server certificate for 127.0.0.1 and
localhost, a client certificate) makes files that `paramserve serve` and `paramserve worker`
accept for mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.credentials import ADMIN_TOKEN, WORKER_TOKEN, write_tokens_file
from tests.support.processes import clean_env

# Kept word for word as in the README's secured tour.
RECIPE = """
umask 077   # the keys: readable by you only
# A test CA (30 days).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \\
  -subj "/CN=paramserve test CA" -keyout ca.key -out ca.pem \\
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
# The server's certificate, for the names clients dial: 127.0.0.1 and localhost.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \\
  -subj "/CN=paramserve server" -keyout server.key -out server.csr
printf '%s\\n' "basicConstraints=critical,CA:FALSE" "extendedKeyUsage=serverAuth" \\
  "subjectAltName=IP:127.0.0.1,DNS:localhost" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -sha256 \\
  -extfile server.ext -out server.pem
# A client certificate, for mutual TLS (the server's --tls-client-ca ca.pem).
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \\
  -subj "/CN=worker-0" -keyout client.key -out client.csr
printf '%s\\n' "basicConstraints=critical,CA:FALSE" "extendedKeyUsage=clientAuth" > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -sha256 \\
  -extfile client.ext -out client.pem
"""


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_recipe_makes_certificates_for_mutual_tls(start_process, tmp_path: Path):
    pki = tmp_path / "pki"
    pki.mkdir()
    done = subprocess.run(
        ["bash", "-euc", RECIPE], cwd=pki, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    tokens = write_tokens_file(tmp_path / "tokens.toml")
    server = start_process(
        "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key",
        "--tls-client-ca", pki / "ca.pem", "--tokens-file", tokens, "--mode", "async",
    )  # fmt: skip
    tls = ["--tls-ca", "ca.pem", "--tls-cert", "client.pem", "--tls-key", "client.key"]
    for host, token, steps, expected in [
        ("localhost", ADMIN_TOKEN, "0", "model created"),
        ("127.0.0.1", WORKER_TOKEN, "2", "done after 2 steps at version 2:"),
    ]:
        address = f"{host}:{server.port}"
        done = subprocess.run(
            [sys.executable, "-m", "paramserve.server", "worker", "--address", address, *tls,
             "--steps", steps],
            capture_output=True, text=True, timeout=240, cwd=pki,
            env=clean_env(PARAMSERVE_TOKEN=token),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout, done.stdout
