#!/usr/bin/env bash
# Decode evidence on one H200 (issue #15), from the repo root, about 4 min:
#   bash benchmarks/decode/run_selection_h200.sh OUTDIR
# 1. the GPU test class of the paged decode kernel (numerics at small shapes)
# 2. torch SDPA GQA decode (the peer), same session
# 3. decode us/step at 32K and 128K (batch 8, 32 q / 8 kv heads, d128, bf16):
#    cuDNN dense, the paged kernel (tuned at 32K), Quest 2K, Double Sparsity
#    1/16, TidalDecode 128 / 2K, MoA; bytes read vs the selected fraction
# 4. accuracy: a needle LM trained for 45 s, needle exact match and answer
#    NLL at 8K-32K with each method against dense decode
# Each step is wrapped in timeout; a failing step is reported and the next runs.
set -uo pipefail
out=${1:?usage: run_selection_h200.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() {  # step NAME SECONDS CMD...: run, log, report the exit status
  local name=$1 secs=$2; shift 2
  echo "=== $name (timeout ${secs}s) ==="
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | grep -v -e Warn -e "^W[0-9]" | tee "$out/$name.log" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
  [ "$rc" = 0 ] || echo "FAILED: $name (exit $rc), see $out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv | tee "$out/gpu.txt"
step gpu_tests 45 python3 -m pytest tests/test_decode_paged.py -k Gpu -q -x -p no:cacheprovider
step peers 35 python3 benchmarks/decode/peer_sdpa_decode.py --lengths 32768 131072 --out "$out/peers.json"
step selection 90 python3 -m experiments.bench_selection --lengths=32768,131072 --tune \
  --peers="$out/peers.json" --out_dir="$out/selection"
step accuracy 100 python3 -m experiments.decode_accuracy --preset=gpu --out_dir="$out/accuracy"
echo "total $SECONDS s; results in $out"
ls -R "$out"
