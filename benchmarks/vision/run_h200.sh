#!/usr/bin/env bash
# Vision attention on one H200 (issue #11), from the repo root; wall budget 4 min
# (a deadline caps every step, most important first).
#   bash benchmarks/vision/run_h200.sh OUTDIR
# 1. GPU test classes (window kernel, NA with the fused bias and routing through
# the core), 2. sj.vision: BiFormer stages (time, compiled memory) and MaxViT-T
# stages (fused permutation and pre-partitioned, fwd and fwd+bwd with the bias
# gradient, vs XLA einsum), 3. torch peers (BiFormer gather, timm SDPA + bias,
# FlexAttention score_mod), 4. NA 1-D 32K / 2-D 256^2 / 128^2 vs cuDNN dense
# (with and without the token permutation) and the cost of the fused NA bias,
# 5. BiFormer fwd+bwd device peak memory (one fresh process per stage), 6. NA
# peers (FlexAttention, SDPA dense), 7. one merged report:
# report/{table.md,*.png,results.json}.
set -uo pipefail
out=${1:?usage: run_h200.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$((SECONDS + ${VISION_BUDGET_S:-212}))  # override: a CPU dry run
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv 2>&1 | tee "$out/gpu.txt"
step() {  # step NAME SECONDS CMD...: timeout (capped by the deadline), log, carry on
  local name=$1 secs=$2; shift 2
  local left=$((deadline - SECONDS))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 8 ]; then echo "=== $name SKIPPED (wall budget spent)"; return; fi
  echo "=== $name (timeout ${secs}s)"
  timeout "$secs" "$@" 2>&1 | grep -v -e Warn -e "^ *warnings.warn" | tee "$out/$name.log" | tail -40
  local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || echo "=== $name FAILED (rc $rc), continuing"
}
# A variable, not a function: timeout runs no shell functions. CPU dry run:
# VISION_BUDGET_S=90 VISION_BENCH_FLAGS="--smoke --impls=xla --na_impls=xla
# --bias_impls=xla" bash benchmarks/vision/run_h200.sh /tmp/out (later flags win)
bench="python3 -m experiments.bench_vision"
x=${VISION_BENCH_FLAGS:-}
# xdist when there: the classes compile-bound (serially 50 s ran 13 of 17).
par=""; python3 -c "import xdist" 2>/dev/null && par="-n 4"
# shellcheck disable=SC2086
step gpu_tests 50 python3 -m pytest tests/test_vision_impls.py -k Gpu -q -p no:cacheprovider $par
# BiFormer first: runs 1 and 2 ran out of time inside MaxViT, before it.
step bench_maxvit_routing 55 $bench --parts=routing,maxvit --out_dir="$out/maxvit_routing" $x
# peer_variants.py writes its JSON at the end; the report reads the .log of a
# step cut off by its timeout instead.
peers="python3 .peer/peer_variants.py --cases"
step peers_maxvit_biformer 40 $peers biformer,maxvit --out "$out/peers_maxvit_biformer.json"
step bench_na 45 $bench --parts=na,na_bias --repeats=5 --out_dir="$out/na" $x
step bench_memory 20 $bench --parts=routing_memory --na_impls=pallas_triton --case_timeout=15 \
  --out_dir="$out/memory" $x
step peers_na1d 20 $peers na1d --out "$out/peers_na1d.json"
step peers_na2d 35 $peers na2d --out "$out/peers_na2d.json"
deadline=$((deadline + 25))  # the report needs no GPU: seconds (jax import)
step report 25 $bench --out_dir="$out/report" \
  --merge="$out/maxvit_routing/results.json,$out/na/results.json,$out/memory/results.json" \
  --peers="$out/peers_maxvit_biformer.json,$out/peers_na1d.json,$out/peers_na2d.json"
echo "=== done in ${SECONDS}s: $out"
