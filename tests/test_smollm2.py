"""Integration on the real SmolLM2-135M with Austen text, reduced protocol (minutes on 2 CPU cores)."""

import copy

import pytest
import torch

from thanos_deploy import checkpoint, compress_model, data, models
from thanos_deploy.evaluate import perplexity

pytestmark = pytest.mark.slow

CALIB = dict(nsamples=16, seqlen=256, seed=0)
EVAL_WINDOWS, EVAL_SEQLEN = 4, 512


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = models.load(models.SMOLLM2_ALIAS)
    ids = data.calibration_tokens("austen", tokenizer, **CALIB)
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), EVAL_SEQLEN, EVAL_WINDOWS)
    dense = perplexity(model, windows)["perplexity"]
    return model, tokenizer, ids, windows, dense


@pytest.fixture(scope="module")
def wanda_2of4(setup, tmp_path_factory):
    model, tokenizer, ids, windows, dense = setup
    pruned = copy.deepcopy(model)
    report = compress_model(pruned, ids, method="wanda", pattern="2:4")
    folder = tmp_path_factory.mktemp("smollm2") / "wanda"
    checkpoint.save(pruned, tokenizer, folder, {"method": "wanda", "layers": report["layers"]})
    return pruned, folder, perplexity(pruned, windows)["perplexity"]


def test_saved_folder_reloads_with_plain_transformers(setup, wanda_2of4):
    from transformers import AutoModelForCausalLM

    _, _, _, windows, _ = setup
    pruned, folder, _ = wanda_2of4
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        a = pruned(windows[:1, :128]).logits
        b = reloaded(windows[:1, :128]).logits
    assert torch.equal(a, b)


def test_every_group_of_four_has_two_zeros(wanda_2of4):
    from transformers import AutoModelForCausalLM

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
    compress_model(magnitude_model, ids, method="magnitude", pattern="2:4")
    magnitude = perplexity(magnitude_model, windows)["perplexity"]
    assert magnitude > wanda, (magnitude, wanda)
