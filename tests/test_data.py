import json

import numpy as np
import pytest
import torch

from thanos_deploy import austen, data
from thanos_deploy.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


def test_austen_reads_six_novels():
    books = austen.novels()
    assert sorted(books) == sorted(austen.TITLES.values())
    assert books["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in books["prideprejudice"]
    assert "Emma Woodhouse, handsome, clever, and rich" in books["emma"].replace("\n", " ")


def test_austen_splits_and_token_counts(tokenizer):
    calib = austen.text("calibration")
    evaluation = austen.text("evaluation")
    assert calib.startswith("SENSE AND SENSIBILITY") and "PRIDE AND PREJUDICE" in calib
    assert evaluation.startswith("EMMA") and "Persuasion" in evaluation
    assert "EMMA" not in calib[:100]
    n = len(data.tokenize(tokenizer, calib))
    assert abs(n - 335_730) / 335_730 < 0.01  # the measured S&S + P&P count


def test_calibration_windows_are_deterministic_slices(tokenizer):
    a = data.calibration_tokens("austen", tokenizer, nsamples=4, seqlen=64, seed=0)
    b = data.calibration_tokens("austen", tokenizer, nsamples=4, seqlen=64, seed=0)
    c = data.calibration_tokens("austen", tokenizer, nsamples=4, seqlen=64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    stream = data.tokenize(tokenizer, austen.text("calibration"))
    for w in a:  # every window is a contiguous slice of the stream
        hits = (stream.unfold(0, 64, 1) == w).all(1)
        assert hits.any()


def test_text_files(tmp_path, tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world. " * 200)
    assert data.calibration_tokens(str(txt), tokenizer, nsamples=2, seqlen=32).shape == (2, 32)
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"document {i} " * 30}) for i in range(5)))
    assert data.calibration_tokens(str(jl), tokenizer, nsamples=3, seqlen=16).shape == (3, 16)


@pytest.mark.parametrize(
    "content, match",
    [("", "is empty"), ("   \n", "is empty"), ("two words", "shorter than one window"), ('{"txt": 1}', "JSON object")],
)
def test_bad_text_files(tmp_path, tokenizer, content, match):
    path = tmp_path / ("f.jsonl" if "{" in content else "f.txt")
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        data.calibration_tokens(str(path), tokenizer, nsamples=1, seqlen=64)


def test_zero_samples_rejected(tokenizer):
    with pytest.raises(UserError, match="--nsamples"):
        data.calibration_tokens("austen", tokenizer, nsamples=0, seqlen=64)


def test_token_files_round_trip(tmp_path):
    ids = torch.randint(0, 1000, (3, 16))
    torch.save(ids, tmp_path / "t.pt")
    np.save(tmp_path / "t.npy", ids.numpy().astype(np.int32))
    from safetensors.torch import save_file

    save_file({"input_ids": ids}, tmp_path / "t.safetensors")
    for name in ("t.pt", "t.npy", "t.safetensors"):
        loaded = data.load_token_file(tmp_path / name)
        assert loaded.dtype == torch.long and torch.equal(loaded, ids), name
    assert data.token_hash(ids) == data.token_hash(ids.clone()) != data.token_hash(ids + 1)


def test_bad_token_files(tmp_path):
    torch.save(torch.rand(2, 4), tmp_path / "f.pt")
    with pytest.raises(UserError, match="integers"):
        data.load_token_file(tmp_path / "f.pt")
    torch.save(torch.arange(5), tmp_path / "v.pt")
    with pytest.raises(UserError, match="2-D"):
        data.load_token_file(tmp_path / "v.pt")
    with pytest.raises(UserError, match="does not exist"):
        data.load_token_file(tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"\[0, 10\)"):
        data.check_tokens(torch.tensor([[1, 12]]), 10)
