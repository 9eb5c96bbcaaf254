#!/usr/bin/env bash
# The exact commands behind benchmarks/ (run on one H200 through the device
# tool, from the repo root). Usage: bash benchmarks/run_h200.sh PART OUTDIR
#   attention-short | attention-long | verify | final | mosaic-verify | mosaic-tests |
#   mosaic-check | mosaic-final | needle-long | train
set -uo pipefail
part=$1; out=$2; mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case $part in
  attention-short)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
    timeout 120 python3 -m experiments.check_gpu_shapes 2>&1 | grep -v Warn | tee "$out/check_gpu_shapes.log"
    timeout 200 python3 .peer/peer_baselines.py --seq 4096 32768 131072 --out "$out/peers.json" 2>&1 | grep -v Warn | tee "$out/peers.log"
    timeout 260 python3 -m experiments.bench_attention --lengths=4096,8192,16384,32768 \
      --warmup=2 --repeats=7 --out_dir="$out/short" --peers="$out/peers.json" 2>&1 | grep -v Warn | tee "$out/short.log" ;;
  attention-long)
    timeout 420 python3 -m experiments.bench_attention --lengths=65536,131072 \
      --warmup=1 --repeats=5 --out_dir="$out/long" 2>&1 | grep -v Warn | tee "$out/long.log"
    # S2 with the Phi-3-small pattern (block 64, local 16, stride 8).
    timeout 150 python3 -m experiments.bench_attention --lengths=32768,131072 --cases=s2 \
      --impls=pallas_triton --block=64 --local_blocks=16 --vert_stride=8 --warmup=1 \
      --repeats=5 --out_dir="$out/phi3" 2>&1 | grep -v Warn | tee "$out/phi3.log" ;;
  verify)  # numerics on the GPU: shared suite, S2 decode, large tiles
    timeout 300 python3 -m pytest tests/test_attention_impls.py tests/test_s2_inference.py -k "Gpu or gpu" \
      -v -p no:cacheprovider 2>&1 | grep -v Warn | tee "$out/gpu_tests.log" | tail -5
    timeout 200 python3 -m experiments.check_gpu_shapes 2>&1 | grep -v -e Warn -e masks.py | tee "$out/check_gpu_shapes.log" ;;
  final)  # attention at 32K and 128K after the exp2 change, and S2 decode
    timeout 300 python3 -m experiments.bench_attention --lengths=32768,131072 --warmup=1 \
      --repeats=5 --out_dir="$out/exp2" 2>&1 | grep -v Warn | tee "$out/exp2.log"
    timeout 250 python3 -m experiments.bench_decode --lengths=32768,131072 \
      --impls=cudnn,pallas_triton --out="$out/decode.json" 2>&1 | grep -v Warn | tee "$out/decode.log" ;;
  mosaic-verify)  # the Mosaic GPU kernel: one smoke call, its GPU tests, a first timing
    nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
    timeout 150 python3 -m experiments.check_gpu_shapes --impl=pallas_mosaic_gpu 2>&1 | grep -v Warn | tee "$out/mosaic_smoke.log" | tail -40
    timeout 240 python3 -m pytest tests/test_mosaic_gpu.py -k TestMosaicGpu -q -p no:cacheprovider \
      2>&1 | grep -v Warn | tee "$out/mosaic_gpu_tests.log" | tail -40
    timeout 200 python3 -m experiments.bench_attention --lengths=16384,32768 \
      --impls=pallas_mosaic_gpu,pallas_triton,cudnn --warmup=2 --repeats=5 \
      --out_dir="$out/mosaic" 2>&1 | grep -v Warn | tee "$out/mosaic_bench.log" | tail -30 ;;
  mosaic-tests)  # the GPU test module (parallel compiles) and a tuning sweep
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    par=""; python3 -c "import xdist" 2>/dev/null && par="-n 6"
    timeout 330 python3 -m pytest tests/test_mosaic_gpu.py -k TestMosaicGpu $par -q -p no:cacheprovider \
      2>&1 | grep -v Warn | tee "$out/mosaic_gpu_tests.log" | tail -30
    timeout 250 python3 -m experiments.tune_kernel --impl=pallas_mosaic_gpu --case=s2 --seq=32768 --out="$out/tune_mosaic_s2_32k.json" \
      2>&1 | grep -v Warn | tee "$out/tune_mosaic.log" | tail -20 ;;
  mosaic-check)  # after a kernel change: the GPU test module and a quick timing
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    par=""; python3 -c "import xdist" 2>/dev/null && par="-n 6"
    timeout 330 python3 -m pytest tests/test_mosaic_gpu.py -k TestMosaicGpu $par -q -p no:cacheprovider \
      2>&1 | grep -v Warn | tee "$out/mosaic_gpu_tests.log" | tail -8
    timeout 200 python3 -m experiments.bench_attention --lengths=32768 --cases=s2,sliding_window \
      --impls=pallas_mosaic_gpu,cudnn --warmup=2 --repeats=7 \
      --out_dir="$out/quick" 2>&1 | grep -v Warn | tee "$out/quick.log" | tail -12 ;;
  mosaic-final)  # Mosaic GPU vs Triton vs cuDNN vs FlexAttention, one session
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
    timeout 100 python3 -m pytest tests/test_mosaic_gpu.py -k "TestMosaicGpu and tunings" -q -p no:cacheprovider \
      2>&1 | grep -v Warn | tee "$out/mosaic_gpu_tests_tunings.log" | tail -3
    timeout 220 python3 .peer/peer_baselines.py --seq 32768 131072 --out "$out/peers.json" 2>&1 \
      | grep -v Warn | tee "$out/peers.log" | tail -3
    timeout 330 python3 -m experiments.bench_attention --lengths=16384,32768,131072 \
      --impls=pallas_mosaic_gpu,pallas_triton,cudnn --warmup=2 --repeats=5 --peers="$out/peers.json" \
      --out_dir="$out/final" 2>&1 | grep -v Warn | tee "$out/final.log" | tail -40 ;;
  needle-long)  # S2 issue (4a): dense vs S2-hybrid needle retrieval at 2K-32K (needs .whl carried)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    mkdir -p "$out/needle"
    python3 -m experiments.s2_needle_long --preset=gpu --out_dir="$out/needle" 2>&1 | grep -v Warn \
      | tee "$out/needle/run.log" | tail -30 ;;
  train)
    common="--config.model.d_model=768 --config.model.num_layers=12 --config.model.num_heads=12
      --config.model.num_kv_heads=4 --config.seq_len=8192 --config.batch_size=4
      --config.num_train_steps=150 --config.dtype=bfloat16 --config.log_every=10
      --config.eval_steps=2 --config.data.max_bytes=40000000 --config.checkpoint.every=150
      --config.attention.options.block_size=128"
    for att in dense s2; do
      extra=""; [ $att = s2 ] && extra="--config.attention.options.local_blocks=4 --config.attention.options.vert_stride=4"
      timeout 280 python3 -m experiments.train --config=configs/lm.py:attention=$att $common $extra \
        --workdir="$out/$att" 2>&1 | grep -v Warn | tail -25 | tee "$out/train_$att.log"
    done ;;
esac
