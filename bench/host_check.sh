#!/usr/bin/env bash
# The host-path figures on a many-core machine (the device tool's 16 cores), in one call of
# about 5 minutes (5.5 on 2 busy cores), beside or instead of bench/gpu_check.sh:
#   1. a whole step at 16M, 1M, small, 1000x300 and 300x1K floats: paramserve (as
#      RemoteOptimizer calls it, and plain push + pull()), bfloat16 on the wire, grpc-raw,
#      the hand-written socket servers, and torch-rpc where torch is installed;
#   2. striped pulls, K = 1, 2, 4 over one connection and over a connection per stripe;
#   3. the fused apply on 1, 2, 4 and 8 threads (bench/optimizer_apply.py), the wire casts
#      on 1, 2 and 4 (bench/wire_casts.py), and the bfloat16 step with the casts on one
#      thread against the default (PARAMSERVE_CAST_THREADS; the daemon's follow apply_threads).
# Prepare the wheels here first (bench/gpu_wheels.sh), then run, e.g.
#   run(command="bash bench/host_check.sh", carry=[".whl"], timeout_s=480)
# Logs land in $OUT (the device tool brings them back), else /tmp/host_check.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
source bench/device_env.sh host_check
systems=paramserve,paramserve-pull,paramserve-bf16,grpc-raw,socket-fast,socket
if "$py" -c "import torch.distributed.rpc" 2>/dev/null; then systems=$systems,torch-rpc; fi

echo "== 1/3 whole step on $(nproc) cores"
timeout 200 "$py" bench/step.py --sizes 16M,1M,small,1000x300,300x1K --systems "$systems" \
  --repeats 3 2>&1 | tee "$out/step.txt"

echo "== 2/3 striped pulls"
timeout 90 "$py" bench/step.py --sizes 16M,1M --systems paramserve --streams 1,2,4,2c,4c \
  --repeats 3 2>&1 | tee "$out/streams.txt"

echo "== 3/3 fused apply and cast threads"
timeout 60 "$py" bench/optimizer_apply.py --sizes 16M --threads 1,2,4,8 2>&1 \
  | tee "$out/apply.txt"
timeout 40 "$py" bench/wire_casts.py --sizes 16M --threads 1,2,4 --repeat 7 2>&1 \
  | tee "$out/casts.txt"
for threads in 1 0; do  # 0: the default (the cores less two, at most 4)
  echo "-- bfloat16 step, PARAMSERVE_CAST_THREADS=$threads, PARAMSERVE_APPLY_THREADS=$threads"
  PARAMSERVE_CAST_THREADS=$([ "$threads" = 0 ] && echo "" || echo "$threads") \
    PARAMSERVE_APPLY_THREADS=$threads timeout 25 "$py" bench/step.py --sizes 16M \
    --systems paramserve,paramserve-bf16 --repeats 3 2>&1 | tee -a "$out/cast_step.txt"
done
