#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (used on the project's borrowed H200):
# the CUDA tests (Thanos/SparseGPT on CUDA, semi-structured 2:4 kernels, TensorRT if present),
# the pruning-math speed benchmark on CUDA, one linear dense vs 2:4 (cuSPARSELt and CUTLASS) at
# LLaMA-2 7B/70B shapes, and `thanos-deploy bench` end to end on a random LLaMA-2-7B-shaped fp16
# model (dense vs 2:4 packed vs structured:0.3 shrunk, pruned with magnitude: speed only), and sharded
# `recover` on a random Llama-3.2-1B-shaped model (memory plan against the peak, throughput).
# No internet, no TensorRT needed. Results go to ${OUT:-bench/results}; CHECKS picks a subset
# (default: "tests prune linear bench recover").
set -uo pipefail
out="${OUT:-bench/results}"
checks="${CHECKS:-tests prune linear bench recover}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/pip.log" 2>&1 || { tail -5 "$out/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__, 'capability', torch.cuda.get_device_capability(), 'cusparselt', getattr(torch.backends, 'cusparselt', None) and torch.backends.cusparselt.is_available())" | tee -a "$out/gpu.txt"
if [[ " $checks " == *" tests "* ]]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_algorithms.py tests/test_compact.py tests/test_export.py tests/test_bench.py tests/test_resume.py 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
fi
if [[ " $checks " == *" prune "* ]]; then
  python3 bench/studies/prune_speed.py --device cuda --repeats "${REPEATS:-2}" --out "$out" 2>&1 | tee "$out/prune_speed_cuda.txt"
fi
if [[ " $checks " == *" linear "* ]]; then
  python3 bench/studies/sparse_linear_speed.py --out "$out" 2>&1 | tail -130 | tee "$out/sparse_linear_speed.txt"
fi
if [[ " $checks " == *" bench "* ]]; then
  model="$(mktemp -d)/llama2-7b-random"
  python3 bench/studies/random_model.py --out "$model" --layers "${LAYERS:-32}"
  printf 'dense\n2:4 magnitude\nstructured:0.3 magnitude\n' >"$model.plan"
  python3 -m thanos_deploy.cli bench "$model" --plan "$model.plan" --calib-tokens "$model/calib.pt" --device cuda --dtype float16 \
      --quick --eval-windows 0 --out "$out/bench-llama2-7b-random" --overwrite 2>&1 | tee "$out/bench_llama2_7b.txt"
  rm -rf "$(dirname "$model")"
fi
if [[ " $checks " == *" recover "* ]]; then
  python3 bench/studies/gpu_recover.py --out "$out" 2>&1 | tail -40 | tee "$out/gpu_recover.txt"
fi
