#!/usr/bin/env bash
# Scatterbrain on one H200 (issue #13), from the repo root; wall budget ~3 min.
#   bash benchmarks/scatterbrain/run_h200.sh OUTDIR
#   QUICK=1 bash benchmarks/scatterbrain/run_h200.sh OUTDIR   # ~75 s: shorter
#     test and bench time boxes (the bench skips cases past its deadline), no tune
# 1. the shared Scatterbrain suite on the compiled Triton kernel (GPU class);
# 2. forward and forward+backward, bf16, B1, local-window support (window 256:
#    511 keys bidirectional, 256 causal; 128-blocks), 32 features, at 8K-128K,
#    against the exact block-sparse kernel on the same support (sj.attention,
#    impl=auto and pallas_triton) and dense cuDNN; numerics of the kernel vs
#    impl=xla (output and gradients) on the first case. JSON, table, plot;
# 3. one Triton tuning point (sub-tiled forward) at 32K, if time remains.
set -uo pipefail
out=${1:?usage: run_h200.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
t_tests=55; t_bench=90; deadline=55
[ -n "${QUICK:-}" ] && { t_tests=30; t_bench=44; deadline=30; }
timeout $t_tests python3 -m pytest tests/test_lowrank_impls.py -k Gpu -q -p no:cacheprovider \
  2>&1 | grep -v Warn > "$out/gpu_tests.log"; tail -12 "$out/gpu_tests.log"
timeout $t_bench python3 -m experiments.bench_scatterbrain \
  --cases=bidir:8192:16:128,bidir:32768:16:128,causal:32768:16:128,bidir:131072:16:128,bidir:32768:32:64 \
  --impls=auto,block_sparse:auto,block_sparse:pallas_triton,cudnn --check=auto \
  --warmup=1 --repeats=5 --deadline=$deadline --out_dir="$out" 2>&1 | grep -v Warn > "$out/bench.log"
tail -40 "$out/bench.log"
[ -n "${QUICK:-}" ] && { ls -l "$out"; exit 0; }
mkdir -p "$out/tune"
timeout 28 python3 -m experiments.bench_scatterbrain --cases=bidir:32768:16:128 \
  --impls=pallas_triton,pallas_triton@sub_kv_fwd=64,pallas_triton@sub_kv_fwd=64+num_warps_fwd=4,block_sparse:auto \
  --check= --warmup=1 --repeats=5 --out_dir="$out/tune" 2>&1 | grep -v Warn > "$out/tune/bench.log"
tail -12 "$out/tune/bench.log"
ls -l "$out"
