"""Integration on the real SmolLM2-135M with Austen text, reduced protocol (minutes on 2 CPU cores)."""

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from thanos_deploy import compress_model, data, load, loading, models
from thanos_deploy.artifact import Manifest, save
from thanos_deploy.compact.linear import CompactLinear
from thanos_deploy.compact.pack import pack_model
from thanos_deploy.compact.shrink import shrink_model
from thanos_deploy.evaluate import perplexity
from thanos_deploy.exporters.onnx import write_artifact
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.request import Pruning
from thanos_deploy.runtime import open_backend

pytestmark = pytest.mark.slow

CALIB = dict(nsamples=16, seqlen=256, seed=0)
EVAL_WINDOWS, EVAL_SEQLEN = 4, 512


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = loading.load(loading.SMOLLM2_ALIAS)
    ids = data.calibration_tokens("austen", tokenizer, **CALIB)
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), EVAL_SEQLEN, EVAL_WINDOWS)
    dense = perplexity(model, windows)["perplexity"]
    return model, tokenizer, ids, windows, dense


@pytest.fixture(scope="module")
def wanda_2of4(setup, tmp_path_factory):
    model, tokenizer, ids, windows, dense = setup
    pruned = copy.deepcopy(model)
    report = compress_model(pruned, ids, Pruning("wanda", "2:4"))
    folder = tmp_path_factory.mktemp("smollm2") / "wanda"
    save(pruned, tokenizer, folder, Manifest(method="wanda", layers=report["layers"]))
    return pruned, folder, perplexity(pruned, windows)["perplexity"]


def test_saved_folder_reloads_with_plain_transformers(setup, wanda_2of4):
    _, _, _, windows, _ = setup
    pruned, folder, _ = wanda_2of4
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        a = pruned(windows[:1, :128]).logits
        b = reloaded(windows[:1, :128]).logits
    assert torch.equal(a, b)


def test_every_group_of_four_has_two_zeros(wanda_2of4):
    _, folder, _ = wanda_2of4
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    count = 0
    for layer in models.decoder_layers(reloaded):
        for name, lin in models.linears(layer).items():
            w = lin.weight
            assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
            count += 1
    assert count == 30 * 7


def test_wanda_perplexity_is_sane_and_beats_magnitude(setup, wanda_2of4):
    model, _, ids, windows, dense = setup
    _, _, wanda = wanda_2of4
    assert dense < wanda < 8 * dense, (dense, wanda)
    magnitude_model = copy.deepcopy(model)
    compress_model(magnitude_model, ids, Pruning("magnitude", "2:4"))
    magnitude = perplexity(magnitude_model, windows)["perplexity"]
    assert magnitude > wanda, (magnitude, wanda)


@pytest.fixture(scope="module")
def thanos_structured(setup):
    """Thanos structured:0.3 masked models, one per α, pruned once for the whole module."""
    model, _, ids, _, _ = setup
    pruned = {}

    def get(alpha):
        if alpha not in pruned:
            pruned[alpha] = copy.deepcopy(model)
            compress_model(pruned[alpha], ids[:8], Pruning("thanos", "structured:0.3", {"alpha": alpha}))
        return pruned[alpha]

    return get


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_shrunk_model_matches_masked_model(setup, thanos_structured, alpha, tmp_path):
    model, tokenizer, ids, windows, _ = setup
    masked_model = thanos_structured(alpha)
    pruned = copy.deepcopy(masked_model)
    with torch.no_grad():
        masked = pruned(windows[:1, :256]).logits
    specs = shrink_model(pruned, alpha=alpha)
    save(pruned, tokenizer, tmp_path / "s", Manifest(storage="shrunk", modules=specs, pattern="structured:0.3"))
    reloaded, _ = load(str(tmp_path / "s"))
    x = windows[:1, :256]
    with torch.no_grad():
        compact32 = reloaded(x).logits
        assert torch.equal(pruned(x).logits, compact32)
        # exact math, linear by linear: same weights bit for bit, same outputs in float64
        for name, module in reloaded.named_modules():
            if not isinstance(module, CompactLinear):
                continue
            reference, weight = masked_model.get_submodule(name).weight, module.dense()
            if reference.shape == weight.shape:  # (narrowed MLPs are checked as a whole below)
                assert torch.equal(weight, reference), name
                probe = torch.randn(3, module.in_features, dtype=torch.float64)
                out64 = copy.deepcopy(module).double()(probe)
                assert torch.allclose(out64, probe @ reference.double().T, rtol=1e-12, atol=1e-12), name
        # whole model in float32: rounding only, its error against float64 at most twice the masked
        # model's own float32 error (RMSNorm computes in float32 even in float64)
        masked64 = copy.deepcopy(masked_model).double()(x).logits
    floor = (masked.double() - masked64).abs().max()
    assert (compact32.double() - masked64).abs().max() <= 2 * floor
    # FLOPs really went down
    dense_macs = sum(l.in_features * l.out_features for layer in models.decoder_layers(model) for l in models.linears(layer).values())
    macs = 0
    for layer in models.decoder_layers(pruned):
        for name, module in models.linears(layer).items():
            macs += module.in_features * module.out_features
        for name, module in layer.named_modules():
            if isinstance(module, CompactLinear):
                kept = module.in_features if module.in_index is None else len(module.in_index)
                macs += module.weight.shape[0] * kept + (0 if module.dense_rows is None else len(module.dense_rows) * module.in_features)
    assert macs < 0.8 * dense_macs


def test_packed_2of4_checkpoint_size(wanda_2of4, tmp_path):
    pruned, _, _ = wanda_2of4
    half = copy.deepcopy(pruned).to(torch.float16)
    specs = pack_model(half, parse_pattern("2:4"))
    out = tmp_path / "p"
    save(half, None, out, Manifest(storage="packed", modules=specs, pattern="2:4"))
    packed_bytes = dense_fp16 = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, spec in specs.items():
            for suffix in ("values", "meta"):
                t = f.get_tensor(f"{name}.{suffix}")
                packed_bytes += t.numel() * t.element_size()
            dense_fp16 += spec["in_features"] * spec["out_features"] * 2
    assert packed_bytes <= 0.57 * dense_fp16


@pytest.fixture(scope="module")
def shrunk_structured(thanos_structured):
    pruned = copy.deepcopy(thanos_structured(0.1))
    shrink_model(pruned, alpha=0.1)
    return pruned


@pytest.fixture(scope="module")
def packed_2of4(wanda_2of4):
    pruned = copy.deepcopy(wanda_2of4[0])
    pack_model(pruned, parse_pattern("2:4"))
    return pruned


# One export per storage on the real model, with the KV cache, through the legacy exporter (20-30 s
# each; the dynamo exporter, the default, takes about 100 s on SmolLM2 and runs in test_export.py and
# test_families.py on tiny models of every family, KV cache included); greedy generation equal to
# torch's on the masked one.
@pytest.mark.parametrize("storage", ["masked", "packed", "shrunk"])
def test_onnx_runtime_parity_per_storage(setup, wanda_2of4, packed_2of4, shrunk_structured, tmp_path, storage):
    model, tokenizer, _, windows, _ = setup
    net = {"masked": wanda_2of4[0], "packed": packed_2of4, "shrunk": shrunk_structured}[storage]
    report = write_artifact(copy.deepcopy(net), tokenizer, tmp_path / "onnx", dtype="fp32", with_past=True, exporter="legacy")
    assert report["exporter"] == "legacy"
    assert report["verification"]["max_abs_diff"] < 1e-3
    ids = windows[:1, :64]
    with torch.no_grad():
        expected = net(ids).logits
    runner = open_backend("ort", str(tmp_path / "onnx"))
    got, state = runner.prefill(ids)
    assert (got - expected).abs().max() < 1e-3
    if storage != "shrunk":
        assert report["two_four"]["two_four_along_k"] == 30 * 7  # every decoder linear; the LM head is dense
    if storage == "masked":
        prompt = windows[:1, :16]
        torch_ids = open_backend("torch", str(wanda_2of4[1])).generate(prompt, 20)
        assert torch.equal(runner.generate(prompt, 20), torch_ids)
