"""GGUF out: llama.cpp's own converter and quantiser on tiny models (its sources are fetched by
`make setup`, as the Austen text is), read back by the `gguf` reader and by transformers' GGUF
loader; the tensors the tools keep at another type are reported with their reason; and the
llama.cpp backend against torch where `thanos-deploy setup llama.cpp` built its library."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thanos_deploy import llamacpp_build as llamacpp
from thanos_deploy.errors import UserError
from thanos_deploy.exporters.gguf import export_gguf

from .conftest import run_cli, tiny_model

NOT_BUILT = "llama.cpp's tools and library are not built here: run `make setup-llamacpp` (about 11 minutes on 2 cores)"


@pytest.fixture(scope="module")
def sources():
    return llamacpp.fetch()  # already in the cache after `make setup`


@pytest.fixture(scope="module")
def width_folder(tmp_path_factory, tiny_folder) -> str:
    """The tiny Llama width-pruned to a plain config: 2 of 4 query heads, MLP 128 → 96."""
    out = tmp_path_factory.mktemp("gguf") / "width"
    r = run_cli("compress", str(tiny_folder), "--method", "thanos", "--pattern", "width:mlp=0.25,heads=0.5,multiple=32", "--nsamples", "4",
                "--seqlen", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="module")
def width_f32(sources, width_folder, tmp_path_factory):
    """(path, report) of the width model exported to f32, once for the tests that read it."""
    path = tmp_path_factory.mktemp("gguf-f32") / "width-f32.gguf"
    return path, export_gguf(width_folder, path, kind="f32")


@pytest.fixture(scope="module")
def width_q8(sources, width_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-q8") / "width-q8.gguf"
    return path, export_gguf(width_folder, path, kind="q8_0")


def tensor_types(path) -> dict:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_width_model_round_trips_through_gguf_readers(width_f32, width_folder):
    path, report = width_f32
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count"].contents() == 2 and reader.fields["llama.feed_forward_length"].contents() == 96
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight"] == [96, 64] and shapes["blk.1.attn_q.weight"] == [64, 32]  # GGUF order: the row length first
    assert set(tensor_types(path).values()) == {"F32"} and report["kept"] == []
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    artifact = AutoModelForCausalLM.from_pretrained(width_folder).eval()  # stock transformers: the plain config
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(artifact(ids).logits, back(ids).logits, atol=1e-5, rtol=0)
    assert report["check"]["max_abs_logit_difference"] < 1e-5 and abs(report["check"]["perplexity_change"]) < 1e-6


def test_q8_0_keeps_rows_that_are_not_whole_blocks_and_says_so(width_q8, tmp_path, tiny_folder):
    assert width_q8[1]["kept"] == [] and tensor_types(width_q8[0])["blk.0.ffn_down.weight"] == "Q8_0"  # 96 and 64: whole blocks of 32
    odd = tmp_path / "odd"  # an MLP of 100: ffn_down's rows cannot be q8_0
    tiny_model("llama", vocab_size=49152, intermediate_size=100).save_pretrained(odd)
    AutoTokenizer.from_pretrained(tiny_folder).save_pretrained(odd)
    config = json.loads((odd / "config.json").read_text())
    del config["architectures"]  # as in folders that earlier versions converted from GGUF: the converter needs a view that names it
    (odd / "config.json").write_text(json.dumps(config))
    r = run_cli("export", "gguf", str(odd), "--type", "q8_0", "--out", str(tmp_path / "odd-q8.gguf"))
    assert r.returncode == 0, r.stderr
    kept = [line.strip() for line in r.stdout.splitlines() if "kept at" in line]
    assert kept == [f"kept at F16 by the converter: blk.{i}.ffn_down.weight (rows of 100 are not a multiple of 32)" for i in (0, 1)], r.stdout
    types = tensor_types(tmp_path / "odd-q8.gguf")
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    difference = float(r.stdout.split("max |logit difference| ")[1].split(",")[0])
    assert 0 < difference < 0.1  # quantised: close, not equal


def test_shrunk_storage_is_refused_before_any_work(sources, tmp_path, tiny_folder):
    out = tmp_path / "shrunk"
    assert run_cli("compress", str(tiny_folder), "--method", "wanda", "--pattern", "structured:0.25", "--shrink", "--nsamples", "2",
                   "--seqlen", "32", "--out", str(out)).returncode == 0
    with pytest.raises(UserError, match="stored shrunk, which llama.cpp cannot read"):
        export_gguf(str(out), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def _built(*names: str) -> bool:
    return all((llamacpp.home() / "build" / "bin" / n).is_file() for n in names)


@pytest.mark.skipif(not _built("llama-quantize"), reason=NOT_BUILT)
def test_k_quant_reports_every_tensor_the_quantiser_kept(sources, width_folder, tmp_path):
    report = export_gguf(width_folder, tmp_path / "width-q4km.gguf", kind="q4_k_m")
    types = tensor_types(tmp_path / "width-q4km.gguf")
    kept = {k["tensor"]: k for k in report["kept"]}
    assert kept and all(k["by"] == "llama-quantize" and k["needs_multiple_of"] == 256 and k["row"] % 256 for k in kept.values())
    assert all(types[name] == k["type"].upper() for name, k in kept.items())  # what the file holds is what was reported
    assert report["check"]["perplexity_change"] is not None


@pytest.mark.skipif(not _built(llamacpp.LIBRARY), reason=NOT_BUILT)
def test_llamacpp_backend_gives_torch_logits_and_tokens(width_f32, width_folder):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make setup-llamacpp")
    from thanos_deploy.runtime import generate
    from thanos_deploy.runtime.llamacpp import LlamaCppBackend

    path = str(width_f32[0])
    backend = LlamaCppBackend(path, threads=2)
    artifact = AutoModelForCausalLM.from_pretrained(width_folder).eval()
    ids = torch.randint(0, 49152, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = artifact(ids).logits
    logits, state = backend.step(ids, None, None, None)
    assert torch.allclose(logits, expected, atol=1e-3, rtol=0) and state is None  # two rows: each from an empty cache
    _, state = backend.step(ids[:1, :20], None, None, None)
    logits, state = backend.step(ids[:1, 20:21], None, None, state)  # one decode step on the cache
    assert torch.allclose(logits[0, -1], expected[0, 20], atol=1e-3, rtol=0) and state == 21
    ours = generate(None, path, "It is a truth universally", 8)
    assert ours["backend"] == "llamacpp" and ours["text"] == generate("torch", width_folder, "It is a truth universally", 8)["text"]


@pytest.mark.skipif(not _built(llamacpp.LIBRARY), reason=NOT_BUILT)
def test_bench_times_a_gguf_against_the_dense_model_in_its_type(width_q8, tiny_folder, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make setup-llamacpp")
    r = run_cli("bench", str(tiny_folder), str(width_q8[0]), "--prompt-lengths", "16", "--decode-tokens", "3", "--reps", "2",
                "--eval-windows", "2", "--eval-seqlen", "64", "--no-peak-memory", "--out", str(tmp_path / "bench"))
    assert r.returncode == 0, r.stderr
    rows = {row["label"]: row for row in json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]}
    assert {row["backend"] for row in rows.values()} == {"llamacpp"}  # the dense model exported to GGUF q8_0 and timed on llama.cpp too
    assert rows["dense"]["target"].endswith("dense-q8_0.gguf") and "weight repacking off" in rows["dense"]["what_ran"]
    assert all(row["perplexity"]["perplexity"] > 1 and row["speed"] for row in rows.values())
    r = run_cli("bench", str(tiny_folder), str(width_q8[0]), "--batch-sizes", "2", "--out", str(tmp_path / "bench2"))
    assert r.returncode == 2 and "one sequence at a time" in r.stderr
