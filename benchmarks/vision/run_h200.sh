#!/usr/bin/env bash
# Vision attention on one H200 (issue #11), from the repo root; wall budget 4 min.
#   bash benchmarks/vision/run_h200.sh OUTDIR
# 1. GPU test classes (window kernel, NA and routing through the core), 2. the
# torch peers (timm SDPA + bias, FlexAttention score_mod/NA, BiFormer gather),
# 3. sj.vision at the same shapes: MaxViT-T stages (fused permutation and
# pre-partitioned, fwd and fwd+bwd with the bias gradient, vs XLA einsum),
# BiFormer stages (time, compiled memory), NA 1-D 32K / 2-D 256^2 / 128^2 vs
# cuDNN dense (with and without the token permutation). JSON, table, plots.
set -uo pipefail
out=${1:?usage: run_h200.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv 2>&1 | tee "$out/gpu.txt"
step() {  # step NAME SECONDS CMD...: run with a timeout, log, carry on on failure
  local name=$1 secs=$2; shift 2
  echo "=== $name (timeout ${secs}s)"
  timeout "$secs" "$@" 2>&1 | grep -v -e Warn -e "^ *warnings.warn" | tee "$out/$name.log" | tail -40
  local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || echo "=== $name FAILED (rc $rc), continuing"
}
step gpu_tests 60 python3 -m pytest tests/test_vision_impls.py -k Gpu -q -x -p no:cacheprovider
step peers 75 python3 .peer/peer_variants.py --cases maxvit,biformer,na1d,na2d --out "$out/peers.json"
step bench_maxvit_routing 60 python3 -m experiments.bench_vision --parts=maxvit,routing \
  --out_dir="$out/maxvit_routing" --peers="$out/peers.json"
step bench_na 45 python3 -m experiments.bench_vision --parts=na --repeats=5 \
  --out_dir="$out/na" --peers="$out/peers.json"
echo "=== done: $out"
