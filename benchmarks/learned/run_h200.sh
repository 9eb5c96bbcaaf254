#!/usr/bin/env bash
# Learned and dynamic sparsity (issue #14) on one H200: GPU tests, prefill
# timings against cuDNN, and the quality evidence. Wall budget: 4.5 minutes.
#
#   bash benchmarks/learned/run_h200.sh OUTDIR           # on the H200
#   bash benchmarks/learned/run_h200.sh OUTDIR --smoke   # CPU: the code paths
#   QUICK=1 bash benchmarks/learned/run_h200.sh OUTDIR   # H200, ~170 s: shorter
#     time boxes, the quality run trained for 70 s
#
# Every step is wrapped in `timeout`; a failing step is reported and the
# script carries on. OUTDIR gets *.log, bench/{bench.json,bench.md,
# prefill_speedup.png} and quality/{learned_evidence.json,learned_evidence.md,
# seer_sparsity.png,routing_loss.png}.
set -uo pipefail
out=${1:?usage: run_h200.sh OUTDIR [--smoke]}
smoke=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$SECONDS
failed=()

run_step() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s; at $((SECONDS - start))s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v -e Warn -e "warnings.warn" "$out/$name.log" | tail -25
  if [ $rc -ne 0 ]; then
    echo "!! $name failed (exit $rc; 124 = time limit); see $out/$name.log"
    failed+=("$name")
  fi
}

if [ "$smoke" = "--smoke" ]; then
  run_step bench 300 python3 -m experiments.learned_bench --lengths=512 \
    --heads=2 --kv_heads=1 --head_dim=32 --block=16 --seer_densities=0.5,0.1 \
    --minference=vertical_slash:64:128 --probs_lengths=512 --dtype=float32 \
    --repeats=2 --out_dir="$out/bench"
  run_step quality 600 python3 -m experiments.learned_evidence --preset=smoke \
    --out_dir="$out/quality"
else
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
  # Compiles dominate the tests and the bench: XLA's GEMM autotuning
  # (Triton configs tried per dot) is off for every step. The kernels
  # measured (Pallas, cuDNN) are not autotuned by XLA; the other dots take
  # cuBLAS defaults.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0"
  # Numerics on the GPU: the probs kernel's suite class (values on every
  # case, gradients on one) and the learned methods on the kernels
  # impl="auto" picks (Mosaic GPU attention; one shared attention program).
  t_tests=65; t_bench=55; t_quality=138
  [ -n "${QUICK:-}" ] && { t_tests=45; t_bench=50; t_quality=70; }
  run_step gpu_tests $t_tests python3 -m pytest tests/test_learned_block_probs.py \
    tests/test_learned_gpu.py -k "Gpu and not structure" -v \
    -p no:cacheprovider --durations=0
  # Prefill of one layer (B 1, 32 q / 8 kv heads, d 128, bf16) vs cuDNN at
  # 32K and 128K: SeerAttention at 50% / 90% block sparsity, MInference
  # vertical-slash (1000, 6096), and the distillation target's kernel.
  run_step bench $t_bench python3 -m experiments.learned_bench \
    --lengths=32768,131072 --seer_densities=0.5,0.1 --probs_lengths=32768 \
    --out_dir="$out/bench"
  # One 4-layer needle LM: dense / local / routing trained in lockstep, Seer
  # gates distilled on the dense one and evaluated 50% -> 90% sparse,
  # MInference prefill (searched per head, and fixed) vs dense prefill.
  run_step quality $((t_quality + 7)) python3 -m experiments.learned_evidence --preset=gpu \
    --max_seconds=$t_quality --out_dir="$out/quality"
fi
echo "== done in $((SECONDS - start))s; failed steps: ${failed[*]:-none}"
