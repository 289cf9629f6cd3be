"""Credentials made at test time: a CA with a server and a client certificate, an unrelated
CA with a client certificate, and tokens files."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ADMIN_TOKEN = "admin-6f1c2d9e8b7a4c3f"
WORKER_TOKEN = "worker-0a9b8c7d6e5f4a3b"
OTHER_WORKER_TOKEN = "worker-second-1d2e3f4a5b6c"


@dataclass(frozen=True)
class Pki:
    """PEM files: ``ca`` signed ``server_*`` and ``client_*``; ``other_ca`` signed nothing used."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """A CA, a server and a client certificate it signed, and a stranger of another CA."""
    ca = _make_ca("paramserve test CA")
    other = _make_ca("an unrelated CA")
    server_cert, server_key = _make_leaf("paramserve server", ca, server=True)
    client_cert, client_key = _make_leaf("worker-0", ca, server=False)
    stranger_cert, stranger_key = _make_leaf("stranger", other, server=False)
    return Pki(
        ca=_write(directory / "ca.pem", _cert_pem(ca[0])),
        server_cert=_write(directory / "server.pem", _cert_pem(server_cert)),
        server_key=_write(directory / "server.key", _key_pem(server_key)),
        client_cert=_write(directory / "client.pem", _cert_pem(client_cert)),
        client_key=_write(directory / "client.key", _key_pem(client_key)),
        other_ca=_write(directory / "other-ca.pem", _cert_pem(other[0])),
        other_client_cert=_write(directory / "stranger.pem", _cert_pem(stranger_cert)),
        other_client_key=_write(directory / "stranger.key", _key_pem(stranger_key)),
    )


def write_tokens_file(path: Path, *, fmt: str = "toml", mode: int = 0o600) -> Path:
    """A tokens file with ADMIN_TOKEN and two worker tokens, created with ``mode``."""
    if fmt == "json":
        text = json.dumps({"admin": [ADMIN_TOKEN], "worker": [WORKER_TOKEN, OTHER_WORKER_TOKEN]})
    else:
        text = f'admin = ["{ADMIN_TOKEN}"]\nworker = ["{WORKER_TOKEN}", "{OTHER_WORKER_TOKEN}"]\n'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    path.chmod(mode)  # the umask may have removed bits
    return path
