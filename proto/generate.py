"""Regenerate the Python gRPC/protobuf code under proto/paramserve/v1 from the .proto files.

Run with the pinned generator (pip install -e ".[test]"): ``python proto/generate.py``.
``--check`` regenerates into a temporary folder and exits 1 if the committed code differs.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = PROTO_ROOT / "paramserve" / "v1"
GRPC_TOOLS_VERSION = "1.85.1"


def generated_names() -> list[str]:
    """Files protoc writes for our .proto files (the committed generated code)."""
    names = []
    for proto in sorted(PACKAGE.glob("*.proto")):
        stem = proto.stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return names


def generate(out_root: Path) -> None:
    """Run protoc (from grpcio-tools) on every .proto file into ``out_root``."""
    from importlib.metadata import version

    import grpc_tools
    from grpc_tools import protoc

    if version("grpcio-tools") != GRPC_TOOLS_VERSION:
        sys.exit(f"grpcio-tools=={GRPC_TOOLS_VERSION} is required, found {version('grpcio-tools')}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in sorted(PACKAGE.glob("*.proto"))]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def check() -> list[str]:
    """Names of generated files that differ from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "paramserve" / "v1"
        return [
            name
            for name in generated_names()
            if not (PACKAGE / name).exists()
            or not filecmp.cmp(fresh / name, PACKAGE / name, shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if args.check:
        stale = check()
        if stale:
            print("stale generated code: " + ", ".join(stale) + "; run python proto/generate.py")
            return 1
        print("generated code is current")
        return 0
    generate(PROTO_ROOT)
    print("generated: " + ", ".join(generated_names()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
