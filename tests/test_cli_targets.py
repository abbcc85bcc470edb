"""--targets/--ignore, the default model and output folder, --device auto, --version and literal help."""

import json

import pytest
import torch

from thanos_deploy import compress_model, models
from thanos_deploy.errors import UserError
from thanos_deploy.loading import pick_device
from thanos_deploy.oneshot import default_out
from thanos_deploy.request import Pruning
from thanos_deploy.targets import matches, select

from .conftest import random_ids, run_cli, tiny_model
from .test_cli import assert_clean_failure


def test_pattern_convention():
    name = "model.layers.3.mlp.down_proj"
    assert matches("down_proj", name) and matches("mlp.down_proj", name) and matches(name, name)
    assert not matches("proj", name) and not matches("layers.3", name)  # suffixes are whole name components
    assert matches(r"re:.*layers\.3\..*", name) and not matches(r"re:layers\.3", name)  # re.match: from the start


def test_targets_and_ignore_pick_the_pruned_linears():
    model = tiny_model()
    report = compress_model(model, random_ids(2, 16), Pruning("wanda", "2:4", targets=["down_proj", "re:.*self_attn.q_proj"], ignore=["model.layers.1.mlp.down_proj"]))
    pruned = {f"{i}.{e['name']}" for i, layer in enumerate(report["layers"]) for e in layer["linears"]}
    assert pruned == {"0.mlp.down_proj", "0.self_attn.q_proj", "1.self_attn.q_proj"}
    assert report["targets"] == ["down_proj", "re:.*self_attn.q_proj"] and report["ignore"] == ["model.layers.1.mlp.down_proj"]
    for i, layer in enumerate(models.decoder_layers(model)):
        for name, linear in models.linears(layer).items():
            assert bool((linear.weight == 0).any()) == (f"{i}.{name}" in pruned), (i, name)


@pytest.mark.parametrize("targets, ignore, match", [
    (["gate"], [], "--targets 'gate' matches no linear"),
    ([], ["re:.*nothing"], "--ignore 're:.*nothing' matches no linear"),
    (["re:("], [], "not a valid regular expression"),
    (["down_proj"], ["down_proj"], "leave no linear to prune"),
])
def test_bad_target_patterns(targets, ignore, match):
    with pytest.raises(UserError, match=match):
        select(tiny_model(), Pruning("wanda", "2:4", targets=targets, ignore=ignore))


def test_cli_unmatched_target_fails_cleanly(tmp_path, tiny_folder):
    out = tmp_path / "out"
    r = run_cli("compress", str(tiny_folder), "--method", "wanda", "--targets", "downproj", "--out", str(out))
    assert_clean_failure(r, out, "--targets 'downproj' matches no linear of the decoder layers (names look like 'model.layers.0.self_attn.q_proj')")


def test_default_out_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(default_out("smollm2-135m", "thanos", "2:4")) == "smollm2-135m-thanos-2-4"
    (tmp_path / "smollm2-135m-thanos-2-4").mkdir()
    assert str(default_out("smollm2-135m", "thanos", "2:4")) == "smollm2-135m-thanos-2-4-2"
    assert str(default_out("/models/My Model/", "wanda", "structured:0.3")) == "My-Model-wanda-structured-0.3"
    assert str(default_out("x/SmolLM2.Q4.gguf", "wanda", "2:4")) == "SmolLM2.Q4-wanda-2-4"


def test_device_auto():
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_compress_with_no_model_and_no_out_in_an_empty_folder(tmp_path):
    """`thanos-deploy compress --pattern 2:4` runs on the embedded SmolLM2 and names its output
    (Wanda and a small calibration set here, to keep it seconds; the default method is Thanos)."""
    r = run_cli("compress", "--pattern", "2:4", "--method", "wanda", "--nsamples", "1", "--seqlen", "32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-wanda-2-4"]
    assert "saved to smollm2-135m-wanda-2-4" in r.stdout
    manifest = json.loads((tmp_path / "smollm2-135m-wanda-2-4" / "thanos_deploy.json").read_text())
    assert manifest["source_model"] == "smollm2-135m" and manifest["targets"] == [] and manifest["ignore"] == []


def test_version_and_literal_help():
    from importlib import metadata

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"thanos-deploy {metadata.version('thanos-deploy')}"
    r = run_cli("compress", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "N:M: store the pattern rows packed" in text and "[n, seqlen]" in text and "structured:P" in text
