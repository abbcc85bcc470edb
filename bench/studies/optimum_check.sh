#!/usr/bin/env bash
# Optimum's ONNX export of a width-pruned folder, checked against stock transformers' logits.
#
#   bench/studies/optimum_check.sh [FOLDER]     (default: prunes SmolLM2 to width:intermediate_size=1050,num_attention_heads=6)
#
# Optimum (optimum-onnx 0.1.0) pins transformers < 4.58, which cannot share .venv (transformers 5),
# so it gets its own venv under ~/.cache/thanos-deploy/optimum-venv. The exported graph is run with
# ONNX Runtime on one prompt and its logits compared with transformers 5's on the same folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${THANOS_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/thanos-deploy}"
venv="$cache/optimum-venv"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
folder="${1:-$work/width}"
if [ -z "${1:-}" ]; then
  .venv/bin/thanos-deploy compress smollm2-135m --pattern width:intermediate_size=1050,num_attention_heads=6 \
      --nsamples 16 --seqlen 256 --out "$folder" >/dev/null
fi
if [ ! -x "$venv/bin/optimum-cli" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q optimum-onnx==0.1.0 onnxruntime
fi
"$venv/bin/optimum-cli" export onnx --model "$folder" --task text-generation-with-past "$work/onnx" >"$work/export.log" 2>&1 \
  || { tail -20 "$work/export.log"; exit 1; }
ids='[[1, 504, 3458, 282, 253, 1345, 30, 1848, 2399, 28, 6463, 314, 2156, 702, 1205, 30]]'
"$venv/bin/python" - "$work/onnx/model.onnx" "$work/onnx.npy" "$ids" <<'PY'
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1])
ids = np.array(json.loads(sys.argv[3]), dtype=np.int64)
feed = {}
for i in session.get_inputs():  # an empty KV cache: batch, KV heads, 0 positions, head_dim
    feed[i.name] = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}.get(
        i.name, np.zeros((1, i.shape[1], 0, i.shape[3]) if len(i.shape) == 4 else (), dtype=np.float32))
np.save(sys.argv[2], session.run(["logits"], feed)[0])
PY
.venv/bin/python - "$folder" "$work/onnx.npy" "$ids" <<'PY'
import json, sys
import numpy as np, torch, transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    ref = model(torch.tensor(json.loads(sys.argv[3]))).logits.numpy()
onnx = np.load(sys.argv[2])
print(f"Optimum export of {sys.argv[1]} ({model.config.num_attention_heads} heads, intermediate {model.config.intermediate_size}): "
      f"max |logit difference| {np.abs(ref - onnx).max():.2e} against transformers {transformers.__version__} (logits up to {np.abs(ref).max():.1f})")
PY
