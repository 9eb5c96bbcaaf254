#!/usr/bin/env bash
# Issue 18 on one H200 (score mods, segment ids): GPU tests of the Triton
# kernel with the new cases, score-mod overhead (sparsejax vs FlexAttention)
# and packed-document training tokens/s. Wall budget: 4 minutes.
#   bash benchmarks/core/run_h200.sh OUTDIR           # on the H200, repo root
#   bash benchmarks/core/run_h200.sh OUTDIR --quick   # H200, <= 45 s: only the
#       Triton score-mod overhead (none / Alibi / RelativeBias W128 at S2 32K
#       and dense causal 16K; 1 warm-up, median of 5), core.json + results.md
#   bash benchmarks/core/run_h200.sh OUTDIR --smoke   # CPU: xla, tiny sizes
set -uo pipefail
out=$1; smoke=${2:-}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$SECONDS
if [ "$smoke" = --quick ]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
  timeout 37 python3 benchmarks/core/bench_core.py --out "$out/core.json" \
    --impls=pallas_triton --parts=attention --warmup=1 --repeats=5 2>&1 \
    | grep -v Warn > "$out/bench_core.log" || echo "bench_core FAILED"
  tail -3 "$out/bench_core.log"
  timeout 6 python3 benchmarks/core/report.py "$out" > /dev/null || echo "report FAILED"
  cat "$out/results.md" 2>/dev/null
  echo "run_h200.sh --quick (core) done in $((SECONDS - start)) s"
  exit 0
fi
if [ "$smoke" = --smoke ]; then
  tests="TestXla and mods_and_segments and alibi"; bench="--smoke --impls=xla"
  t_bench=900  # a slow CPU compiles for minutes
else
  t_bench=165
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
  tests="TestPallasTritonGpu and (mods_and_segments or deterministic)"; bench=""
fi

# 1. GPU tests in the background: the benchmark compiles meanwhile (CPU) and
#    starts timing only once they have finished (--wait_pid).
timeout 120 python3 -m pytest tests/test_attention_impls.py -k "$tests" -v \
  -p no:cacheprovider > "$out/gpu_tests.log" 2>&1 &
tests_pid=$!

# 2. Score-mod overhead (Triton: none / Alibi / RelativeBias W=128; Mosaic GPU
#    without a mod) at S2 32K and dense causal 16K, then training tokens/s
#    with data.pack=True vs False.
timeout $t_bench python3 benchmarks/core/bench_core.py --out "$out/core.json" \
  --wait_pid $tests_pid $bench 2>&1 | grep -v -e Warn -e "custom data configuration" \
  | tee "$out/bench_core.log" | tail -16 || echo "bench_core FAILED"
wait $tests_pid; echo "GPU tests exit code $?"
grep -E "PASSED|FAILED|ERROR|passed|failed" "$out/gpu_tests.log" | tail -12

# 3. FlexAttention with the same score mods, shapes and masks (torch 2.11).
if [ "$smoke" != --smoke ]; then
  timeout 60 python3 benchmarks/core/flex_score_mod.py --out "$out/flex.json" 2>&1 \
    | grep -v Warn | tee "$out/flex.log" | tail -8 || echo "flex FAILED"
fi

# 4. Markdown table and plot.
timeout 30 python3 benchmarks/core/report.py "$out" || echo "report FAILED"
echo "run_h200.sh (core) done in $((SECONDS - start)) s"
