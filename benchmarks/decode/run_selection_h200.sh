#!/usr/bin/env bash
# Decode evidence on one H200 (issue #15), from the repo root, at most
# BUDGET_S seconds in all (default 100):
#   bash benchmarks/decode/run_selection_h200.sh OUTDIR
#   SMOKE=1 bash benchmarks/decode/run_selection_h200.sh OUTDIR  # CPU, tiny
#   STEPS=accuracy BUDGET_S=150 bash ...  # one step, with its own budget
# Steps, in priority order; each runs under timeout, capped by what is left
# of the budget, and a step that no longer fits is skipped:
# 1. peers: torch SDPA GQA decode (default dispatch and each backend)
# 2. gpu_tests: the paged kernel's GPU test class (needs >= 25 s left)
# 3. selection (capped by SEL_S if set): decode us/step at 32K and 128K (batch 8, 32 q / 8 kv heads,
#    d128, bf16): cuDNN dense, the paged kernel (tuning sweep at 32K),
#    Quest 2K, Double Sparsity 1/16, TidalDecode 128 / 2K, MoA, with bytes
#    read; then the breakdown rows (selection alone, attention alone, Quest
#    at pages of 32). Each wave compiles in parallel before it is timed;
#    rows are written as they come, and no case starts past the budget.
# 4. accuracy: a needle LM trained for up to 40 s, needle exact match and
#    answer NLL at 8K-32K per method (needs >= 70 s left: not within the
#    default budget after steps 1-2; its JSON is rewritten after every job)
# A failing step is reported and the next one runs.
set -uo pipefail
out=${1:?usage: run_selection_h200.sh OUTDIR}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
smoke=${SMOKE:-0}
steps=" ${STEPS:-peers gpu_tests selection accuracy} "
if [ "$smoke" = 1 ]; then budget=${BUDGET_S:-1500}; else budget=${BUDGET_S:-100}; fi
deadline=$((SECONDS + budget))
left() { echo $((deadline - SECONDS)); }
step() {  # step NAME SECONDS MIN_SECONDS CMD...: run, capped by the budget
  local name=$1 secs=$2 need=$3; shift 3
  [[ "$steps" == *" $name "* ]] || return 0
  local l; l=$(left)
  [ "$secs" -gt "$l" ] && secs=$l
  if [ "$secs" -lt "$need" ]; then
    echo "SKIPPED: $name (needs ${need} s, ${l} s of the budget left)"; return 0
  fi
  echo "=== $name (timeout ${secs}s) ==="
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | grep -v -e Warn -e "^W[0-9]" | tee "$out/$name.log" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
  [ "$rc" = 0 ] || echo "FAILED: $name (exit $rc), see $out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv \
  2>&1 | tee "$out/gpu.txt"
if [ "$smoke" = 1 ]; then
  sel=(--smoke); acc=(--preset=smoke)
else
  sel=(--lengths=32768,131072); acc=(--preset=gpu)
fi
step peers 25 10 python3 benchmarks/decode/peer_sdpa_decode.py --lengths 32768 131072 \
  --out "$out/peers.json"
step gpu_tests 40 25 python3 -m pytest tests/test_decode_paged.py -k Gpu -q \
  -p no:cacheprovider
# No new case starts within 8 s of its timeout (the last timing, outputs).
# SEL_S caps the selection step (default: what is left) so accuracy can run.
l=$(left); [ -n "${SEL_S:-}" ] && [ "$SEL_S" -lt "$l" ] && l=$SEL_S
step selection "$l" 20 python3 -m experiments.bench_selection "${sel[@]}" --tune \
  --budget_s=$((l - 8)) --peers="$out/peers.json" --out_dir="$out/selection"
if [ "$smoke" != 1 ]; then  # training gets what ~50 s of start-up,
  # compiles and evaluation leave, at most 40 s
  t=$(( $(left) - 50 )); [ "$t" -gt 40 ] && t=40; acc+=(--train_seconds="$t")
fi
step accuracy 300 70 python3 -m experiments.decode_accuracy "${acc[@]}" \
  --out_dir="$out/accuracy"
echo "total $SECONDS s (budget $budget s); results in $out"
ls -R "$out"
