"""Numerics: half-precision models prune like float32 (statistics in float32); singular Hessians warn
and non-finite values fail, naming the layer."""

import copy

import pytest
import torch

from thanos_deploy import compress_model, models
from thanos_deploy.errors import UserError
from thanos_deploy.request import Pruning

from .conftest import random_ids, tiny_model


def masks(model) -> list[torch.Tensor]:
    return [linear.weight != 0 for layer in models.decoder_layers(model) for linear in models.linears(layer).values()]


@pytest.mark.parametrize("method", ["wanda", "thanos"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_the_float32_masks_up_to_ties(method, dtype):
    base, ids = tiny_model("llama"), random_ids(8, 64)
    reference = copy.deepcopy(base)
    compress_model(reference, ids, Pruning(method, "2:4"))
    half = copy.deepcopy(base).to(dtype)
    report = compress_model(half, ids, Pruning(method, "2:4"))
    assert report["sparsity"] == pytest.approx(0.5)
    for ours, theirs in zip(masks(half), masks(reference)):
        assert (ours.reshape(ours.shape[0], -1, 4).sum(-1) == 2).all()  # still exactly 2:4
        # rounding the weights to fp16/bf16 may only swap near-tied scores: at most 1 % of entries
        assert float((ours == theirs).float().mean()) >= 0.99
    assert all(linear.weight.dtype == dtype for linear in models.linears(models.decoder_layers(half)[0]).values())


def test_fewer_tokens_than_inputs_warns_naming_the_layer():
    model = tiny_model("llama")
    report = compress_model(model, random_ids(1, 16), Pruning("thanos", "2:4"))
    warned = [w for layer in report["layers"] for e in layer["linears"] for w in e.get("warnings", [])]
    assert any(w.startswith("layers.0.self_attn.q_proj: rank-deficient Hessian: 16 calibration tokens for 64 inputs") for w in warned)
    enough = compress_model(tiny_model("llama"), random_ids(4, 64), Pruning("thanos", "2:4"))
    assert not any("rank-deficient" in w for layer in enough["layers"] for e in layer["linears"] for w in e.get("warnings", []))


def test_a_non_finite_weight_is_an_error_naming_the_layer():
    model = tiny_model("llama")
    models.decoder_layers(model)[1].self_attn.q_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(UserError, match=r"^layers\.1\.self_attn\.q_proj: pruning produced inf or NaN"):
        compress_model(model, random_ids(4, 32), Pruning("thanos", "2:4"))


def test_non_finite_calibration_inputs_are_an_error_naming_the_layer():
    model = tiny_model("llama")
    model.get_input_embeddings().weight.data[:] = float("inf")
    with pytest.raises(UserError, match=r"^layers\.0\.self_attn\.q_proj: the calibration inputs contain inf or NaN"):
        compress_model(model, random_ids(4, 32), Pruning("wanda", "2:4"))


def test_overflowing_outputs_are_an_error_naming_the_layer():
    model = tiny_model("llama")
    mlp = models.decoder_layers(model)[0].mlp
    mlp.gate_proj.weight.data[:] = mlp.up_proj.weight.data[:] = 0.5  # silu(s)·s > 0 on every channel
    mlp.down_proj.weight.data[:] = 3e38  # finite weights and inputs, but their sum overflows
    with pytest.raises(UserError, match=r"^layers\.0: the pruned layer's outputs contain inf or NaN"):
        compress_model(model, random_ids(4, 32), Pruning("magnitude", "2:4"))
