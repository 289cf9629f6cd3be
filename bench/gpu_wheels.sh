#!/usr/bin/env bash
# Fetch, on this machine, the wheels bench/gpu_check.sh needs on the GPU machine (the device
# tool's: Python 3.12, no package registry, no grpcio-health-checking/-reflection/-status).
# The versions are the ones this checkout's .venv runs, so the generated gRPC code matches.
# Writes .whl/ (ignored through .git/info/exclude); pass `carry: [".whl"]` to the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
pins=$("$py" - <<'PY'
from importlib.metadata import version
names = ["grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status",
         "googleapis-common-protos", "protobuf"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl $pins
# paramserve itself, built here (pure Python), so nothing is built on the GPU machine.
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
ls -1 .whl
