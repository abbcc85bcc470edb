"""The command line as a user meets it: real files, command lines run through main(argv), and the
installed console script in a fresh process where the environment must be set before it starts."""

import json

import pytest

from .conftest import run_cli, run_installed


def assert_clean_failure(result, out, match):
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if out is not None:
        assert not out.exists()
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("It is a truth universally acknowledged. " * 400)
    return path


@pytest.mark.parametrize("pattern", ["2:5:1", "3:2", "0:4", "structured:1.5", "unstructured:-0.1", "banana"])
def test_bad_patterns(tmp_path, tiny_folder, pattern):
    out = tmp_path / "out"
    r = run_cli("compress", str(tiny_folder), "--pattern", pattern, "--out", str(out))
    assert_clean_failure(r, out, "invalid pattern")


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("compress", "./no/such/model", "--out", str(out)), out, "does not exist")


def test_unsupported_architecture(tmp_path):
    import transformers

    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(folder)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("compress", str(folder), "--out", str(out)), out, "unsupported architecture 'gpt2'")


def test_nm_not_dividing_input(tmp_path, tiny_folder, text_file):
    out = tmp_path / "out"
    r = run_cli("compress", str(tiny_folder), "--method", "wanda", "--pattern", "2:3", "--calib", str(text_file), "--out", str(out))
    assert_clean_failure(r, out, "not a multiple of M=3")


@pytest.mark.parametrize("content, match", [("", "is empty"), ("just a few words", "shorter than one window")])
def test_bad_calibration_files(tmp_path, tiny_folder, content, match):
    path = tmp_path / "c.txt"
    path.write_text(content)
    out = tmp_path / "out"
    r = run_cli("compress", str(tiny_folder), "--method", "wanda", "--calib", str(path), "--seqlen", "64", "--out", str(out))
    assert_clean_failure(r, out, match)


def test_zero_samples(tmp_path, tiny_folder):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("compress", str(tiny_folder), "--method", "wanda", "--nsamples", "0", "--out", str(out)), out, "--nsamples")


def test_existing_output_without_overwrite(tmp_path, tiny_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("compress", str(tiny_folder), "--method", "wanda", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_c4_without_network(tmp_path, tiny_folder):
    out = tmp_path / "out"
    # no route to the hub: an endpoint on a closed local port (the same failure as an offline machine);
    # a fresh process, since huggingface_hub reads HF_ENDPOINT when it is imported
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    r = run_installed("compress", str(tiny_folder), "--method", "wanda", "--calib", "c4", "--out", str(out), env=env)
    assert_clean_failure(r, out, "cannot load 'c4'")


def test_output_under_a_file(tmp_path, tiny_folder):
    (tmp_path / "file").write_text("not a folder")
    r = run_cli("compress", str(tiny_folder), "--method", "wanda", "--out", str(tmp_path / "file" / "out"))
    assert_clean_failure(r, None, "is not a writable folder")


def test_compress_and_eval_round_trip(tmp_path, tiny_folder, text_file):
    out = tmp_path / "runs" / "pruned"  # missing parent folders are made, as in the README's examples
    r = run_cli(
        "compress", str(tiny_folder), "--method", "wanda", "--pattern", "4:8", "--calib", str(text_file),
        "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2", "--eval-data", str(text_file), "--eval-seqlen", "64",
        "--out", str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "saved to" in r.stdout
    manifest = json.loads((out / "thanos_deploy.json").read_text())
    assert manifest["method"] == "wanda" and manifest["pattern"] == "4:8"
    assert manifest["calibration"]["nsamples"] == 4 and manifest["calibration"]["tokens_hash"].startswith("sha256:")
    assert manifest["evaluation"]["pruned"]["perplexity"] > 0
    assert all("relative_error" in e for layer in manifest["layers"] for e in layer["linears"])
    assert "torch" in manifest["versions"]

    r = run_cli("eval", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["windows"] == 2
    assert result["perplexity"] == pytest.approx(manifest["evaluation"]["pruned"]["perplexity"], rel=1e-4)

    # the same output again needs --overwrite, and then replaces it atomically
    again = run_cli(
        "compress", str(tiny_folder), "--method", "magnitude", "--pattern", "2:4", "--calib", str(text_file),
        "--nsamples", "2", "--seqlen", "64", "--out", str(out), "--overwrite",
    )
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "thanos_deploy.json").read_text())["method"] == "magnitude"


def test_hub_id_without_network(tmp_path):
    out = tmp_path / "out"
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    r = run_installed("compress", "some-org/some-model", "--out", str(out), env=env)
    assert_clean_failure(r, out, "could not load model 'some-org/some-model'")
