"""The committed generated code matches the .proto files; the package installs as paramserve.*."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current() -> None:
    """Regenerates with the pinned grpcio-tools and fails if anything committed differs."""
    pytest.importorskip("grpc_tools")
    out = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_generated_imports_resolve_as_paramserve_v1() -> None:
    from paramserve.v1 import parameter_server_pb2, parameter_server_pb2_grpc

    assert parameter_server_pb2.DESCRIPTOR.package == "paramserve.v1"
    assert hasattr(parameter_server_pb2_grpc, "ParameterServerStub")


@pytest.mark.slow
def test_wheel_has_no_bare_top_level_modules(tmp_path: Path) -> None:
    """Everything installs under paramserve/; never a bare `server` or `client` package."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("paramserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.startswith("paramserve-")}
    assert tops == {"paramserve"}, tops
    for pkg in ("optim_core", "server", "client", "v1"):
        assert f"paramserve/{pkg}/__init__.py" in names or pkg == "v1"
    assert "paramserve/v1/parameter_server_pb2.py" in names
    assert "paramserve/v1/parameter_server.proto" in names
