#!/usr/bin/env bash
# One device call, several families (the lead's wrapper around each family's
# benchmarks/<family>/run_h200.sh). From the repo root on the H200:
#   bash benchmarks/run_families_h200.sh OUTDIR family[:script[:seconds[:args]]] ...
# e.g.  bash benchmarks/run_families_h200.sh $OUT linear::120 core:run_mosaic_h200.sh:90
# `seconds` caps a family's script (what it wrote before the cap comes back);
# `args` (comma-separated) follow OUTDIR on its command line.
# Installs the carried wheels (.whl, made by benchmarks/fetch_wheels.sh: ml_collections,
# grain, tfds, fla-core and their dependencies),
# runs each family script into OUTDIR/<family>, and packs each into
# OUTDIR/<family>.tar.gz (the device tool returns at most 8 files).
set -uo pipefail
out=$1; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl > "$out/pip.log" 2>&1 || tail -5 "$out/pip.log"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
start=$SECONDS
for item in "$@"; do
  IFS=: read -r family script secs args <<< "$item"
  script=${script:-run_h200.sh}; secs=${secs:-600}
  name=$family; [ "$script" != run_h200.sh ] && name=${family}_${script%.sh}
  echo "######## $name (cap ${secs} s, at $((SECONDS - start)) s)"
  mkdir -p "$out/$name"
  # shellcheck disable=SC2086
  timeout -k 5 "$secs" bash "benchmarks/$family/$script" "$out/$name" ${args//,/ } 2>&1 \
    | tee "$out/$name.console.log" | tail -40
  mv "$out/$name.console.log" "$out/$name/console.log" 2>/dev/null
  tar czf "$out/$name.tar.gz" -C "$out" "$name" && rm -rf "${out:?}/$name"
done
echo "######## all done at $((SECONDS - start)) s"
