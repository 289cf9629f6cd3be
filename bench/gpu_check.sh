#!/usr/bin/env bash
# The GPU check, in one call on the GPU machine (the device tool), well under 5 minutes:
#   1. the GPU-marked tests (the CuPy path against the NumPy path and the Keras references);
#   2. optimizer apply speed against the device's copy bandwidth (bench/gpu_apply.py);
#   3. a whole 16M-float step with the daemon on --device gpu against --device cpu;
#   4. 8 workers in sync mode (16M floats, bench/shards.py), --device gpu against cpu.
# Then one table. Prepare the wheels here first (bench/gpu_wheels.sh), then run, e.g.
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Logs and JSON land in $OUT (the device tool brings them back), else /tmp/gpu_check.
# Without a GPU every part says so and the script still exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
source bench/device_env.sh gpu_check
cores=$(nproc)

echo "== 1/4 GPU tests"
timeout 200 "$py" -m pytest -q -o addopts="" -p no:cacheprovider -m gpu -n "$cores" \
  tests/optim/test_conformance.py tests/optim/test_api.py tests/optim/test_slabs.py \
  tests/optim/test_fused_gpu.py tests/server/test_store.py 2>&1 | tee "$out/gpu_tests.txt" | tail -15

echo "== 2/4 apply vs copy bandwidth"
timeout 120 "$py" bench/gpu_apply.py --sizes 16M,64M,256M | tee "$out/gpu_apply.txt"

echo "== 3/4 whole step, --device gpu vs cpu"
for device in cpu gpu; do
  PARAMSERVE_DEVICE=$device timeout 120 "$py" bench/step.py --sizes 16M \
    --systems paramserve --repeats 3 --json > "$out/step_$device.json" 2> "$out/step_$device.err"
done

echo "== 4/4 8 workers in sync mode, --device gpu vs cpu"
for device in cpu gpu; do
  timeout 150 "$py" bench/shards.py --sizes 16M --shards 1 --workers 8 --modes sync \
    --steps 4 --warmup 1 --fast-steps 2 --device $device --json "$out/sync8_$device.json" \
    > "$out/sync8_$device.txt" 2>&1
done

"$py" - "$out" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
tests = (out / "gpu_tests.txt").read_text().strip().splitlines()
summary = next((l for l in reversed(tests) if re.search(r"passed|failed|error|skipped", l)), "?")
apply = (out / "gpu_apply.txt").read_text()
result = next((l for l in apply.splitlines() if l.startswith("RESULT")), apply.strip()[:120])
steps = {}
for device in ("cpu", "gpu"):
    try:
        rows = json.loads((out / f"step_{device}.json").read_text())
        rows = rows.get("results", rows) if isinstance(rows, dict) else rows
        ps = [r for r in rows if r.get("system") == "paramserve" and r.get("size") == "16M"]
        steps[device] = ps[0]["steps_per_s"] if ps else None
    except (OSError, ValueError, KeyError, TypeError):
        steps[device] = None
ratio = (steps["gpu"] / steps["cpu"]) if steps["gpu"] and steps["cpu"] else None
print("\n| check | result |\n| --- | --- |")
print(f"| GPU-marked tests | {summary} |")
print(f"| Adam apply vs d2d copy | {result} |")
fmt = lambda x: f"{x:.2f}" if x else "n/a"
print(f"| 16M step, steps/s cpu / gpu | {fmt(steps['cpu'])} / {fmt(steps['gpu'])} "
      f"(gpu / cpu {fmt(ratio)}; target >= 1.0) |")
sync8 = {}
for device in ("cpu", "gpu"):
    try:
        rows = json.loads((out / f"sync8_{device}.json").read_text())["results"]
        sync8[device] = rows[0]["agg_steps_per_s"] if rows and rows[0]["verified"] else None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        sync8[device] = None
ratio8 = (sync8["gpu"] / sync8["cpu"]) if sync8["gpu"] and sync8["cpu"] else None
print(f"| 8 workers sync 16M, all workers' steps/s cpu / gpu | {fmt(sync8['cpu'])} / "
      f"{fmt(sync8['gpu'])} (gpu / cpu {fmt(ratio8)}; target > 1.0) |")
PY
