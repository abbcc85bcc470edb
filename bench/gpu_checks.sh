#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (used on the project's borrowed H200):
# the CUDA tests (Thanos/SparseGPT on CUDA, semi-structured 2:4 kernels, TensorRT if present)
# and the pruning-math speed benchmark on CUDA. Results go to ${OUT:-bench/results}.
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/pip.log" 2>&1 || { tail -5 "$out/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'capability', torch.cuda.get_device_capability())" | tee -a "$out/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_algorithms.py tests/test_compact.py tests/test_export.py 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
python3 bench/prune_speed.py --device cuda --repeats "${REPEATS:-2}" --out "$out" 2>&1 | tee "$out/prune_speed_cuda.txt"
