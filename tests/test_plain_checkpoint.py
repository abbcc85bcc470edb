"""The plain Hugging Face form of an MLP-only shrunk model: stock transformers loads it, no code from us."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from thanos_deploy import compress_model, data, loading
from thanos_deploy.artifact import Manifest, save
from thanos_deploy.compact.plain import plain_config
from thanos_deploy.compact.shrink import shrink_model
from thanos_deploy.request import Pruning

from .conftest import random_ids, run_cli, tiny_model

STOCK_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
assert not any(name.startswith("thanos_deploy") for name in sys.modules), "thanos_deploy was imported"
"""


@pytest.mark.slow
def test_mlp_only_shrunk_smollm2_loads_in_stock_transformers(tmp_path):
    model, tokenizer = loading.load(loading.SMOLLM2_ALIAS)
    calib = data.calibration_tokens("austen", tokenizer, nsamples=2, seqlen=128, seed=0)
    ids = data.windows(data.evaluation_tokens("austen", tokenizer), 128, 1)
    compress_model(model, calib, Pruning("thanos", "structured:0.3", {"alpha": 0.0}, targets=["down_proj"]))
    with torch.no_grad():
        masked = model(ids).logits
        masked64 = copy.deepcopy(model).double()(ids).logits
    specs = shrink_model(model, alpha=0.0)
    plain = plain_config(model, specs)
    assert plain == {"intermediate_size": [1536, 1080]}  # ⌈0.3·1536⌉ = 461 channels dropped, 1075 kept, rounded to 1080
    folder = tmp_path / "plain"
    save(model, tokenizer, folder, Manifest(storage="shrunk", modules=specs, plain=plain))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", STOCK_LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")], check=True)
    stock = torch.load(tmp_path / "logits.pt")
    noise = float((masked.double() - masked64).abs().max())  # the masked model's own float32 rounding
    diff = float((stock - masked).abs().max())
    print(f"stock transformers vs masked: max abs logit diff {diff:.2e}; masked fp32 vs fp64 {noise:.2e}")
    assert diff <= 2 * noise


def test_cli_mlp_only_shrink_writes_a_plain_checkpoint(tmp_path, tiny_folder):
    out = tmp_path / "plain"
    r = run_cli("compress", str(tiny_folder), "--method", "thanos", "--alpha", "0", "--pattern", "structured:0.25",
                "--targets", "down_proj", "--shrink", "--nsamples", "2", "--seqlen", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "plain Hugging Face checkpoint" in r.stdout and "intermediate_size 128 → 96" in r.stdout
    manifest = json.loads((out / "thanos_deploy.json").read_text())
    assert manifest["plain"] == {"intermediate_size": [128, 96]} and manifest["targets"] == ["down_proj"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    r = run_cli("inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert {row["storage"] for row in rows if row["name"].endswith("down_proj")} == {"narrowed"}


def test_different_widths_per_layer_are_not_plain():
    model = tiny_model()
    compress_model(model, random_ids(4, 32), Pruning("thanos", "structured:0.3", {"alpha": 0.0}, targets=["model.layers.0.mlp.down_proj"]))
    specs = shrink_model(model, alpha=0.0)
    assert plain_config(model, specs) is None and model.config.intermediate_size == 128
