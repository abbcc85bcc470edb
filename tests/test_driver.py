"""The sequential driver on tiny random models, against an independent naive loop."""

import copy

import pytest
import torch

from thanos_deploy import compress_model, models
from thanos_deploy.errors import UserError
from thanos_deploy.methods.stats import Stats
from thanos_deploy.pipeline.hooks import AllInputsSeen, InputStats
from thanos_deploy.request import Execution, Pruning

from .conftest import random_ids, tiny_model


def test_stats_match_their_definition():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    s = Stats.from_inputs(x)
    flat = x.reshape(-1, 5).double()
    assert torch.allclose(s.hessian.double(), flat.T @ flat, rtol=1e-5)
    assert torch.allclose(s.sq_norms.double(), (flat**2).sum(0), rtol=1e-5)
    assert s.tokens == 21


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
        ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
    ],
)
def test_linears_reading_one_input_share_one_accumulator(kind, expected):
    model = tiny_model(kind)
    layer = models.decoder_layers(model)[0]
    subs = models.linears(layer)
    captured = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: captured.update({n: a[0].detach().clone()})) for n, m in subs.items()]
    collector = InputStats(subs, hessian=True)
    try:
        with pytest.raises(AllInputsSeen):  # the pass stops once the last linear has its input
            model(random_ids(2, 16))
    finally:
        collector.close()
        for h in handles:
            h.remove()
    assert sorted(map(sorted, collector.groups())) == sorted(map(sorted, expected))
    for name, x in captured.items():  # each linear's statistics are those of its own input
        flat = x.reshape(-1, x.shape[-1])
        assert torch.allclose(collector[name].hessian, flat.T @ flat, rtol=1e-4, atol=1e-4)


def naive_wanda(model, ids, sparsity):
    """Reference: for each layer, hook its linears during a full-model forward, prune, move on."""
    for layer in models.decoder_layers(model):
        subs = models.linears(layer)
        norms = {n: torch.zeros(m.in_features) for n, m in subs.items()}

        def accumulate(module, args, name):
            norms[name] += args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0)

        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: accumulate(mod, a, n)) for n, m in subs.items()]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        for n, m in subs.items():
            w = m.weight.data
            score = w.abs() * norms[n].sqrt()
            k = int(sparsity * w.shape[1])
            idx = torch.argsort(score, dim=1, stable=True)[:, :k]
            w.scatter_(1, idx, 0.0)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_driver_matches_naive_sequential_loop(kind):
    model = tiny_model(kind)
    reference = copy.deepcopy(model)
    ids = random_ids(6, 32)
    report = compress_model(model, ids, Pruning("wanda", "unstructured:0.5"), Execution(batch_tokens=64))  # 3 batches
    naive_wanda(reference, ids, 0.5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b), name
    assert report["sparsity"] == pytest.approx(0.5)
    assert len(report["layers"]) == 2


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "opt"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.4", "structured:0.25"])
def test_every_family_and_pattern(kind, pattern):
    model = tiny_model(kind)
    embed_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    report = compress_model(model, random_ids(4, 16), Pruning("magnitude", pattern))
    for layer in models.decoder_layers(model):
        for name, lin in models.linears(layer).items():
            w = lin.weight
            if pattern == "2:4":
                assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
            elif pattern.startswith("structured"):
                assert int((w == 0).all(0).sum()) == int(0.25 * w.shape[1]), name
            else:
                assert int((w == 0).sum()) >= int(0.4 * w.numel()), name
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert all(e["relative_error"] > 0 for layer in report["layers"] for e in layer["linears"])


def test_unsupported_architecture():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match=r"unsupported architecture 'gpt2': transformer.h.0.attn.c_attn.weight \[32, 96\] is a 2-D weight outside nn.Linear"):
        compress_model(model, random_ids(1, 8, 64), Pruning("wanda", "2:4"))


def test_nm_must_divide_input_size():
    with pytest.raises(UserError, match="not a multiple of M=3"):
        compress_model(tiny_model(), random_ids(1, 8), Pruning("wanda", "2:3"))


def test_bfloat16_model():
    model = tiny_model().to(torch.bfloat16)
    compress_model(model, random_ids(2, 16), Pruning("wanda", "2:4"))
    w = models.decoder_layers(model)[0].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
