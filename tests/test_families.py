"""Every decoder-only family, on tiny random configs built offline from transformers' config classes:
decoder layers and linears found generically, Thanos 2:4 and structured:0.3 (shrunk), evaluation,
save, load, inspect, and ONNX export with KV cache where torch's exporter handles the family."""

import math

import pytest
import torch

from thanos_deploy import compress_model, load, models
from thanos_deploy.artifact import Manifest, save
from thanos_deploy.compact.linear import CompactLinear
from thanos_deploy.compact.plain import plain_config
from thanos_deploy.compact.shrink import shrink_model
from thanos_deploy.errors import UserError
from thanos_deploy.evaluate import perplexity
from thanos_deploy.inspection import inspect_model
from thanos_deploy.pipeline import streamed
from thanos_deploy.pipeline.offload import load_skeleton
from thanos_deploy.request import Pruning

from .conftest import random_ids, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "falcon",
            "stablelm", "olmo2", "granite", "cohere"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_compress_shrink_save_load_inspect(tmp_path, kind):
    dense = tiny_model(kind)
    calib, ids = random_ids(4, 32), random_ids(2, 24, seed=7)
    layers = models.decoder_layers(dense)
    assert len(layers) == 2 and models.linears(layers[0])

    nm = tiny_model(kind)
    compress_model(nm, calib, Pruning("thanos", "2:4"))
    for layer in models.decoder_layers(nm):
        for name, linear in models.linears(layer).items():  # every linear, fused ones included, strictly 2:4 along K
            groups = linear.weight.reshape(linear.out_features, -1, 4)
            assert bool(((groups == 0).sum(-1) >= 2).all()), name
    result = perplexity(nm, random_ids(2, 32, seed=3))
    assert math.isfinite(result["perplexity"])
    save(nm, None, tmp_path / "nm", Manifest(storage="masked", pattern="2:4"))
    reloaded, _ = load(str(tmp_path / "nm"))
    assert torch.allclose(logits(reloaded, ids), logits(nm, ids), atol=1e-5)

    st = tiny_model(kind)
    compress_model(st, calib, Pruning("thanos", "structured:0.3", {"alpha": 0.0}))
    masked = logits(st, ids)
    specs = shrink_model(st, alpha=0.0)
    mlp = models.mlp(models.linears(models.decoder_layers(tiny_model(kind))[0]))
    if mlp:  # a gated or plain MLP: narrowed, no gather in its consumer
        down = models.decoder_layers(st)[0].get_submodule(mlp[1])
        assert not isinstance(down, CompactLinear) and down.in_features < dense.get_submodule(f"{models.layer_prefix(dense, 0)}.{mlp[1]}").in_features
    assert torch.allclose(logits(st, ids), masked, atol=1e-4)
    manifest = Manifest(storage="shrunk", modules=specs, pattern="structured:0.3")
    save(st, None, tmp_path / "st", manifest)
    reloaded, _ = load(str(tmp_path / "st"))
    assert torch.allclose(logits(reloaded, ids), masked, atol=1e-4)
    rows = inspect_model(reloaded, Manifest.read(tmp_path / "st"))["rows"]
    assert rows and all(r["density"] < 1 for r in rows)
    if not mlp:  # the gather fallback is visible in inspect
        assert any(r["storage"] == "shrunk (gather)" for r in rows)


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_plain_mlp_only_shrink(tmp_path, kind):
    """structured on the MLP's consumer only, α = 0: a stock architecture with a smaller MLP width."""
    model = tiny_model(kind)
    subs = models.linears(models.decoder_layers(model)[0])
    mlp = models.mlp(subs)
    consumer = mlp[1] if mlp else next(n for n in subs if n.endswith("down_proj"))
    compress_model(model, random_ids(4, 32), Pruning("thanos", "structured:0.3", {"alpha": 0.0}, targets=[consumer]))
    ids = random_ids(2, 24, seed=7)
    masked = logits(model, ids)
    specs = shrink_model(model, alpha=0.0)
    plain = plain_config(model, specs)
    if not mlp:
        assert plain is None  # fused gate/up: gathers, not a standard architecture
        return
    (field, (old, new)), = plain.items()
    assert new < old and new % 8 == 0
    save(model, None, tmp_path / "plain", Manifest(storage="shrunk", modules=specs, plain=plain))
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert getattr(stock.config, field) == new
    assert torch.allclose(logits(stock, ids), masked, atol=1e-4)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_rejected_with_one_line(kind):
    model = tiny_model(kind)
    with pytest.raises(UserError, match="mixture-of-experts weights"):
        compress_model(model, random_ids(2, 16), Pruning("wanda", "2:4"))


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_onnx_export_with_kv_cache(tmp_path, kind):
    """The shrunk model exports with a KV cache and ONNX Runtime agrees with PyTorch (export_onnx
    verifies). The legacy exporter first (seconds on a tiny model; dynamo takes ~40 s each here),
    dynamo where legacy fails; a family neither handles is skipped with the exporters' reasons."""
    from thanos_deploy.exporters.onnx import export_onnx

    model = tiny_model(kind)
    compress_model(model, random_ids(4, 32), Pruning("thanos", "structured:0.3", {"alpha": 0.0}))
    shrink_model(model, alpha=0.0)
    reasons = []
    for exporter in ("legacy", "dynamo"):
        try:
            report = export_onnx(model, tmp_path, with_past=True, exporter=exporter)
        except UserError as e:
            reasons.append(str(e))
            continue
        assert report["verification"]["max_abs_diff"] <= 1e-3
        assert report["inputs"][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
        return
    pytest.skip(f"torch's exporters cannot export {kind} with a KV cache: {'; '.join(reasons)}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_streamed_perplexity_equals_the_whole_models(tmp_path, kind):
    """`eval --offload` reads one decoder layer at a time and runs the model's own head code (a
    family's soft-capping and logit scales included): the same perplexity as the whole model."""
    dense = tiny_model(kind)
    dense.save_pretrained(tmp_path / "m")
    windows = random_ids(3, 16, seed=3)
    whole = perplexity(dense, windows)
    streamed_value = streamed.perplexity(load_skeleton(str(tmp_path / "m")), windows, device=torch.device("cpu"), batch_tokens=32)
    assert streamed_value["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
