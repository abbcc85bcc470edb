"""Width pruning: whole MLP neurons, query heads and KV groups out of every layer, written as a plain
Hugging Face checkpoint that stock transformers loads without this package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from thanos_deploy import compress_model, models, oneshot
from thanos_deploy.errors import UserError
from thanos_deploy.methods import get_method
from thanos_deploy.methods.stats import Stats
from thanos_deploy.patterns import Columns, parse_pattern
from thanos_deploy.request import Pruning, prepare
from thanos_deploy.width import plan

from .conftest import random_ids, run_cli, tiny_model

PATTERN = "width:mlp=0.25,heads=0.5,multiple=32"


# ---------------------------------------------------------------- the consumer's update, against the math


def test_thanos_on_given_columns_is_the_least_squares_optimum():
    """Removing columns Q and moving the rest to minimise ‖(W' - W)X‖² has the closed form
    W'_K = W X Xᵀ_K (X_K X_Kᵀ)⁻¹ on the kept columns K; Thanos's update must give it (no damping)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 400, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    Q = (1, 4, 5, 9)
    K = [j for j in range(12) if j not in Q]
    new = get_method("thanos").prune(W, Stats.from_inputs(X.T, hessian=True), Columns(Q), percdamp=1e-12, alpha=0.0)
    expected = W @ X @ X[K].T @ torch.linalg.inv(X[K] @ X[K].T)
    assert torch.all(new[:, list(Q)] == 0)
    assert torch.allclose(new[:, K], expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "activation"])
def test_every_method_zeroes_exactly_the_given_columns(method):
    g = torch.Generator().manual_seed(1)
    X, W = torch.randn(300, 16, generator=g), torch.randn(6, 16, generator=g)
    new = get_method(method).prune(W, Stats.from_inputs(X, hessian=True), Columns((0, 7, 15)))
    assert torch.all(new[:, [0, 7, 15]] == 0)
    untouched = [j for j in range(16) if j not in (0, 7, 15)]
    if method in ("wanda", "magnitude", "activation"):
        assert torch.equal(new[:, untouched], W[:, untouched])  # no update
    else:
        assert not torch.equal(new[:, untouched], W[:, untouched])  # compensated


def test_activation_importance_removes_the_quietest_neurons_and_updates_nothing():
    """Minitron's ranking: the MLP neurons whose activations (down_proj's inputs) carry the least
    energy on the calibration tokens go; the weights that stay are the dense ones."""
    ids, dense = random_ids(4, 32), tiny_model("llama")
    seen = []
    down = models.decoder_layers(dense)[0].mlp.down_proj
    hook = down.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    with torch.no_grad():
        dense(ids)
    hook.remove()
    quietest = torch.cat(seen).double().pow(2).sum(0).argsort()[: down.in_features // 4]
    pruned = tiny_model("llama")
    compress_model(pruned, ids, Pruning("activation", "width:mlp=0.25,multiple=32"))
    weight = models.decoder_layers(pruned)[0].mlp.down_proj.weight
    removed = (weight == 0).all(0).nonzero().flatten()
    assert sorted(removed.tolist()) == sorted(quietest.tolist())
    kept = [j for j in range(down.in_features) if j not in set(removed.tolist())]
    assert torch.equal(weight[:, kept], down.weight[:, kept])


def test_activation_importance_refuses_single_weight_patterns():
    with pytest.raises(UserError, match="ranks whole units.*width"):
        get_method("activation").options(parse_pattern("2:4"), {})


# ---------------------------------------------------------------- widths: spellings, rounding, refusals


class Config:
    def __init__(self, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, hidden_size=576):
        self.intermediate_size, self.num_attention_heads, self.num_key_value_heads = intermediate_size, num_attention_heads, num_key_value_heads
        self.hidden_size, self.model_type = hidden_size, "llama"


def test_fractions_and_targets_resolve_to_whole_units_per_group():
    w = plan(parse_pattern("width:mlp=0.3,heads=0.33"), Config())  # SmolLM2: 9 heads in 3 groups of 3
    assert w.old == (1536, 9, 3) and w.new == (1088, 6, 3) and w.head_dim == 64  # 1075.2 neurons, to the nearest multiple of 64
    assert plan(parse_pattern("width:mlp=0.3,multiple=1"), Config()).new[0] == 1075
    assert plan(parse_pattern("width:mlp=0.3,multiple=256"), Config()).new[0] == 1024 and w.advice() is None
    assert "not a multiple of 16" in plan(parse_pattern("width:intermediate_size=1075"), Config()).advice()
    w = plan(parse_pattern("width:intermediate_size=1024,num_attention_heads=6"), Config())
    assert w.new == (1024, 6, 3)
    w = plan(parse_pattern("width:kv_heads=0.34,num_attention_heads=4"), Config())
    assert w.new == (1536, 4, 2)
    assert str(parse_pattern("width:heads=0.5,mlp=0.25")) == "width:mlp=0.25,heads=0.5"
    assert str(parse_pattern("width:multiple=32,heads=0.5,mlp=0.25")) == "width:mlp=0.25,heads=0.5,multiple=32"


@pytest.mark.parametrize("spec, match", [
    ("width:mlp=0.9999", "leaves no unit of intermediate_size"),
    ("width:heads=0.9", "leaves no unit of num_attention_heads"),
    ("width:num_attention_heads=7", "cannot be spread evenly over 3 KV groups"),
    ("width:intermediate_size=4096", "larger than the model's 1536"),
    ("width:num_key_value_heads=4", "larger than the model's 3"),
    ("width:depth=0.5", "unknown key 'depth'"),
    ("width:mlp=1.5", "fraction in [0, 1)"),
    ("width:mlp=0.3,multiple=0", "multiple=0 must be a whole number"),
    ("width:mlp=0.3,multiple=2048", "multiple=2048 is larger than the model's MLP width 1536"),
])
def test_impossible_widths_are_one_clear_error(spec, match):
    with pytest.raises(UserError, match=match.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        plan(parse_pattern(spec), Config())


def test_outlier_rows_have_no_place_in_a_plain_architecture():
    with pytest.raises(UserError, match="--alpha 0 with width patterns"):
        get_method("thanos").options(parse_pattern(PATTERN), {"alpha": 0.1})


# ---------------------------------------------------------------- the plain checkpoint, loaded by stock transformers

LOAD_STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
assert not any(name.startswith("thanos_deploy") for name in sys.modules), "thanos_deploy was imported"
"""


@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3", "opt"])  # GQA; GQA with per-head q/k norms; fused qkv_proj and gate_up_proj; MHA with biases
def test_plain_checkpoint_loads_in_stock_transformers_with_the_masked_models_logits(tmp_path, kind):
    tiny_model(kind).save_pretrained(tmp_path / "dense")
    save_file({"input_ids": random_ids(4, 32)}, tmp_path / "ids.safetensors")
    pattern = "width:mlp=0.25,multiple=32" if kind == "opt" else PATTERN
    result = oneshot(prepare(str(tmp_path / "dense"), out=tmp_path / "plain", method="thanos", pattern=pattern, calib_tokens=tmp_path / "ids.safetensors"))
    masked = tiny_model(kind)
    compress_model(masked, random_ids(4, 32), Pruning("thanos", pattern))
    ids = random_ids(2, 16, seed=5)
    torch.save(ids, tmp_path / "ids.pt")
    r = subprocess.run([sys.executable, "-c", LOAD_STOCK, str(tmp_path / "plain"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        expected = masked(ids).logits
    got = torch.load(tmp_path / "logits.pt")
    assert (got - expected).abs().max() < 1e-4  # float32 noise: the same products in another order
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    manifest = json.loads((tmp_path / "plain" / "thanos_deploy.json").read_text())
    assert manifest["storage"] == "plain" and len(manifest["units"]) == config["num_hidden_layers"]
    widths = plan(parse_pattern(pattern), tiny_model(kind).config)
    assert all(len(u["mlp"]) == widths.new[0] and len(u["heads"]) == widths.new[1] for u in manifest["units"].values())
    assert [config.get("intermediate_size", config.get("ffn_dim")), config["num_attention_heads"]] == list(widths.new[:2])
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in tiny_model(kind).parameters())


def test_heads_of_a_family_that_derives_head_dim_are_refused_before_writing(tmp_path):
    tiny_model("opt").save_pretrained(tmp_path / "dense")
    save_file({"input_ids": random_ids(2, 32)}, tmp_path / "ids.safetensors")
    with pytest.raises(UserError, match="does not build these widths from a plain config"):
        oneshot(prepare(str(tmp_path / "dense"), out=tmp_path / "plain", method="wanda", pattern=PATTERN, calib_tokens=tmp_path / "ids.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "ids.safetensors"]


def test_cli_prints_the_widths_and_refuses_bad_widths_cleanly(tmp_path, tiny_folder):
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged. " * 300)
    r = run_cli("compress", str(tiny_folder), "--method", "thanos", "--pattern", PATTERN, "--calib", str(text), "--nsamples", "2",
                "--seqlen", "32", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "intermediate_size 128 → 96, num_attention_heads 4 → 2" in r.stdout and "plain Hugging Face checkpoint" in r.stdout
    for args, match in [(["--pattern", "width:heads=0.99"], "leaves no unit"), (["--pattern", PATTERN, "--alpha", "0.1"], "--alpha 0"),
                        (["--pattern", "width:spam=1"], "unknown key 'spam'"), (["--pattern", PATTERN, "--pack"], "drop --shrink/--pack")]:
        r = run_cli("compress", str(tiny_folder), "--calib", str(text), "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "bad"), *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and match in r.stderr, r.stderr
        assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()


@pytest.mark.parametrize("kind, pattern, match", [
    ("gpt_neox", PATTERN, r"attention\.query_key_value fuses queries, keys and values"),  # per-head interleaved
    ("falcon", PATTERN, r"self_attention\.query_key_value \(128 outputs\)"),
    ("olmo2", PATTERN, r"self_attn\.q_norm\.weight acts on all heads together"),  # a norm over heads×head_dim
    ("stablelm", PATTERN, "does not build these widths from a plain config"),  # head_dim from hidden_size / heads
])
def test_a_family_whose_heads_cannot_be_pruned_is_refused_naming_the_module(tmp_path, kind, pattern, match):
    tiny_model(kind).save_pretrained(tmp_path / "dense")
    save_file({"input_ids": random_ids(2, 32)}, tmp_path / "ids.safetensors")
    with pytest.raises(UserError, match=match):
        oneshot(prepare(str(tmp_path / "dense"), out=tmp_path / "plain", method="thanos", pattern=pattern, calib_tokens=tmp_path / "ids.safetensors"))
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "granite", "cohere"])
def test_width_pruning_across_families_matches_the_masked_model(tmp_path, kind):
    tiny_model(kind).save_pretrained(tmp_path / "dense")
    save_file({"input_ids": random_ids(4, 32)}, tmp_path / "ids.safetensors")
    result = oneshot(prepare(str(tmp_path / "dense"), out=tmp_path / "plain", method="thanos", pattern=PATTERN, calib_tokens=tmp_path / "ids.safetensors"))
    masked = tiny_model(kind)
    compress_model(masked, random_ids(4, 32), Pruning("thanos", PATTERN))
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        assert (result.model(ids).logits - masked(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("storage, pattern", [("plain", PATTERN), ("masked", "2:4"), ("packed", "2:4")])
def test_configs_carry_the_rope_keys_older_transformers_read(tmp_path, storage, pattern):
    """transformers 4.x (Optimum's pin) reads rope_theta, not rope_parameters, and silently uses its
    default otherwise: every artifact's config.json carries both."""
    model = tiny_model("llama")
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 12345.0}
    model.save_pretrained(tmp_path / "dense")
    save_file({"input_ids": random_ids(4, 32)}, tmp_path / "ids.safetensors")
    oneshot(prepare(str(tmp_path / "dense"), out=tmp_path / "out", method="wanda", pattern=pattern, storage=storage, calib_tokens=tmp_path / "ids.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 12345.0


def test_head_counts_the_family_config_refuses_are_named_before_any_work():
    """Gemma 3 270M (hidden 640, 4 heads, 1 KV head, head_dim 256): 3 heads is a valid layout by the
    groups, but transformers refuses a hidden size that is not a multiple of the heads. The plan,
    which needs the config alone, says which counts it accepts."""
    import transformers

    config = transformers.AutoConfig.for_model("gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                               num_key_value_heads=1, head_dim=256, vocab_size=262144)
    with pytest.raises(UserError, match=r"does not accept 3 query heads .* accepts 1, 2 or 4 query heads"):
        plan(parse_pattern("width:mlp=0.3,heads=0.25"), config)
    assert plan(parse_pattern("width:mlp=0.3,heads=0.5"), config).new == (1408, 2, 1)
