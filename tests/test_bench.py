"""`bench`: the statistics on synthetic timings, the plan, and the command end to end on a tiny model."""

import json
import random
import signal
import statistics

import numpy as np
import pytest
import torch

from thanos_deploy import compress_model, loading
from thanos_deploy.artifact import Manifest, save
from thanos_deploy.bench.plan import DEFAULT_PLAN, parse_plan
from thanos_deploy.bench.timing import percentile, schedule, speedup, summarize
from thanos_deploy.compact.pack import pack_model
from thanos_deploy.errors import UserError
from thanos_deploy.evaluate import backend_perplexity, perplexity
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.plots import pareto_front
from thanos_deploy.request import Pruning
from thanos_deploy.runtime import open_backend

from .conftest import random_ids, run_cli, start_cli, tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- statistics


def test_percentile_interpolates_between_ranks():
    x = [10.0, 20.0, 30.0, 40.0]  # h = 3q/100
    assert percentile(x, 0) == 10 and percentile(x, 100) == 40
    assert percentile(x, 50) == 25  # h = 1.5
    assert percentile(x, 90) == pytest.approx(37)  # h = 2.7: 30 + 0.7 * 10
    assert percentile([5.0], 99) == 5
    samples = [random.Random(1).expovariate(1) for _ in range(101)]
    for q in (50, 90, 99):
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))
    assert percentile(list(reversed(x)), 50) == 25  # order of the samples does not matter


def test_summarize_reports_the_three_percentiles():
    s = summarize([float(v) for v in range(1, 101)])
    assert (s["p50"], s["p90"], s["p99"], s["n"]) == (pytest.approx(50.5), pytest.approx(90.1), pytest.approx(99.01), 100)


def test_speedup_of_a_constant_ratio_has_no_width_even_under_drift():
    # the machine drifts 10x over the run, but each candidate repetition ran right after dense's:
    # paired resampling sees the constant ratio and nothing else
    dense = [2.0 * (1 + i) for i in range(8)]
    candidate = [d / 1.6 for d in dense]
    s = speedup(dense, candidate)
    assert s["ratio"] == pytest.approx(1.6)
    assert s["low"] == pytest.approx(1.6) and s["high"] == pytest.approx(1.6)
    assert s["spread"] == [pytest.approx(1.6), pytest.approx(1.6)]


def test_speedup_interval_covers_the_true_ratio_and_narrows_with_repetitions():
    rng = random.Random(0)

    def timings(n):
        dense = [1.0 * rng.lognormvariate(0, 0.05) for _ in range(n)]
        return dense, [0.5 * rng.lognormvariate(0, 0.05) for _ in range(n)]  # true speed-up 2

    small, large = speedup(*timings(5)), speedup(*timings(200))
    for s in (small, large):
        assert s["low"] <= 2.0 <= s["high"]
        assert s["low"] <= s["ratio"] <= s["high"]
        assert s["spread"][0] <= s["ratio"] <= s["spread"][1]
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 2
    d, c = timings(6)
    assert speedup(d, c, seed=3) == speedup(d, c, seed=3)  # seeded: the same numbers for the same run


def test_speedup_is_dense_over_candidate():
    s = speedup([1.0, 1.0, 1.0], [4.0, 4.0, 4.0])
    assert s["ratio"] == pytest.approx(0.25)  # the candidate is 4x slower
    with pytest.raises(ValueError):
        speedup([1.0], [1.0, 2.0])


def test_schedule_interleaves_candidates_in_every_repetition_and_cell():
    order = schedule(["dense", "a", "b"], [(1, 8), (4, 8)], 2)
    assert [label for _, _, label in order] == ["dense", "a", "b"] * 4
    assert [cell for _, cell, _ in order[:6]] == [(1, 8)] * 3 + [(4, 8)] * 3
    assert [rep for rep, _, _ in order] == [0] * 6 + [1] * 6


def test_pareto_front_keeps_points_nobody_beats_on_both_axes():
    points = [(1.0, 30.0), (1.3, 60.0), (1.2, 40.0), (1.1, 50.0), (1.3, 90.0)]  # (speed-up, perplexity)
    assert pareto_front(points, x_better="higher") == [0, 2, 1]  # (1.1, 50) is beaten by (1.2, 40); (1.3, 90) by (1.3, 60)


def test_backend_perplexity_equals_the_model_perplexity(tiny_folder):
    windows = random_ids(3, 32, vocab=200)
    backend = open_backend("torch", str(tiny_folder))
    assert backend_perplexity(backend, windows)["perplexity"] == pytest.approx(perplexity(backend.model, windows)["perplexity"], rel=1e-5)


# ---------------------------------------------------------------- plans


def test_default_plan_is_the_standard_comparison():
    labels = [r.label for r in parse_plan(DEFAULT_PLAN)]
    assert labels == ["dense", "2:4 sparsegpt", "2:4 thanos alpha=0", "structured:0.3 sparsegpt",
                      "structured:0.3 thanos alpha=0", "structured:0.3 thanos alpha=0.1", "width:mlp=0.32,heads=0.33 thanos"]


def test_plan_adds_dense_and_rejects_bad_lines():
    assert [r.label for r in parse_plan("2:4 wanda  # a comment\n")] == ["dense", "2:4 wanda"]
    for text, match in [("2:4 pruneall\n", "unknown method 'pruneall'"), ("2:4\n", "is not 'dense' or"),
                        ("dense\n", "no pruned run"), ("2:5:1 wanda\n", "2:5:1"), ("2:4 wanda:alpha=0.1\n", "does not take"),
                        ("2:4 wanda\n2:4 wanda\n", "twice")]:
        with pytest.raises(UserError, match=match):
            parse_plan(text)


# ---------------------------------------------------------------- the command


def _packed_candidate(tiny_folder, out, save_dtype=None):
    net, tokenizer = loading.load(str(tiny_folder))
    report = compress_model(net, random_ids(4, 32, vocab=200), Pruning("magnitude", "2:4"))
    if save_dtype is not None:
        net.to(save_dtype)
    modules = pack_model(net, parse_pattern("2:4"), alpha=0.0)
    save(net, tokenizer, out, Manifest(storage="packed", pattern="2:4", method="magnitude", options={}, seconds=report["seconds"], modules=modules))
    return out


def test_bench_artifacts_on_torch_end_to_end(tmp_path, tiny_folder):
    packed = _packed_candidate(tiny_folder, tmp_path / "packed")
    out = tmp_path / "bench"
    r = run_cli("bench", str(tiny_folder), str(packed), "--batch-sizes", "1,2", "--prompt-lengths", "16", "--decode-tokens", "3",
                "--reps", "2", "--eval-windows", "2", "--eval-seqlen", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "prefill speed-up" in r.stdout and "what ran" in r.stdout
    result = json.loads((out / "bench.json").read_text())
    assert [row["label"] for row in result["rows"]] == ["dense", "packed"]
    dense, cand = result["rows"]
    assert set(cand["speed"]) == {"1x16", "2x16"}
    for key, s in cand["speed"].items():
        raw = result["raw"]["packed"][key]
        assert len(raw["prefill"]) == 2 and all(len(steps) == 3 for steps in raw["decode"])
        assert s["prefill"]["p50"] == pytest.approx(statistics.median(raw["prefill"]))
        assert s["prefill_speedup"]["ratio"] == pytest.approx(statistics.median(result["raw"][dense["label"]][key]["prefill"]) / s["prefill"]["p50"])
        assert s["prefill_tokens_per_s"] == pytest.approx(int(key.split("x")[0]) * 16 / s["prefill"]["p50"])
    assert dense["speed"]["1x16"]["prefill_speedup"]["ratio"] == 1.0
    assert "run dense" in cand["what_ran"] and "expect 1.0×" in cand["what_ran"]  # CPU: 2:4 does not run sparse
    assert cand["speed"]["2x16"]["prefill_flop_ratio"] == pytest.approx(1.0)  # ... so its executed FLOPs equal dense
    assert cand["pruning_seconds"]["prune"] == Manifest.read(packed).seconds["prune"]
    assert cand["memory"]["peak_rss_bytes"] > 10 * 2**20 and cand["bytes"] == (packed / "model.safetensors").stat().st_size
    assert dense["perplexity"]["windows"] == 2 and cand["perplexity"]["perplexity"] > 1
    assert result["machine"]["versions"]["torch"] == torch.__version__
    assert result["command"].startswith("thanos-deploy bench")
    md = (out / "bench.md").read_text()
    assert "| packed | 2×16 |" in md and "model-FLOP ratio" in md
    for name in ("latency.png", "pareto.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_SIGNATURE and len(blob) > 1000


def test_bench_plan_on_torch_and_ort(tmp_path, tiny_folder):
    plan = tmp_path / "plan.txt"
    plan.write_text("structured:0.25 wanda\nwidth:mlp=0.25,heads=0.5,multiple=32 thanos\n")
    out = tmp_path / "bench"
    r = run_cli("bench", str(tiny_folder), "--plan", str(plan), "--backend", "torch", "--backend", "ort", "--nsamples", "4", "--seqlen", "32",
                "--batch-sizes", "2", "--prompt-lengths", "16", "--decode-tokens", "2", "--reps", "2", "--eval-windows", "2",
                "--eval-seqlen", "32", "--no-peak-memory", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = {row["label"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"dense [torch]", "dense [ort]", "structured:0.25 wanda [torch]", "structured:0.25 wanda [ort]",
                         "width:mlp=0.25,heads=0.5,multiple=32 thanos [torch]", "width:mlp=0.25,heads=0.5,multiple=32 thanos [ort]"}
    plain = rows["width:mlp=0.25,heads=0.5,multiple=32 thanos [torch]"]
    assert plain["storage"] == "plain" and "plain narrower config" in plain["what_ran"]
    dense_torch = rows["dense [torch]"]
    # half the query heads: half the attention multiply-adds; column pruning keeps them all
    assert plain["attention_macs_per_position"] * 2 == dense_torch["attention_macs_per_position"]
    assert rows["structured:0.25 wanda [torch]"]["attention_macs_per_position"] == dense_torch["attention_macs_per_position"]
    cell = plain["speed"]["2x16"]
    linear = dense_torch["linear_macs_per_token"], plain["linear_macs_per_token"]
    attention = dense_torch["attention_macs_per_position"], plain["attention_macs_per_position"]
    assert cell["prefill_flop_ratio"] == pytest.approx((linear[0] + attention[0] * 8.5) / (linear[1] + attention[1] * 8.5))
    assert cell["decode_flop_ratio"] == pytest.approx((linear[0] + attention[0] * 17.5) / (linear[1] + attention[1] * 17.5))
    assert rows["width:mlp=0.25,heads=0.5,multiple=32 thanos [ort]"]["perplexity"] == plain["perplexity"]
    shrunk_ort, shrunk_torch = rows["structured:0.25 wanda [ort]"], rows["structured:0.25 wanda [torch]"]
    assert shrunk_ort["dense"] == "dense [ort]" and shrunk_torch["dense"] == "dense [torch]"  # ratios within one backend
    assert shrunk_ort["what_ran"].startswith("ONNX Runtime cpu") and "columns removed" in shrunk_torch["what_ran"]
    assert shrunk_ort["perplexity"] == shrunk_torch["perplexity"]  # scored once per artifact
    assert shrunk_torch["speed"]["2x16"]["prefill_flop_ratio"] > 1.0 and shrunk_torch["storage"] == "shrunk"
    assert shrunk_ort["target"].endswith("-onnx") and shrunk_ort["bytes"] > 0
    assert (out / "latency.png").read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _fails_cleanly(r, out, match):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_bench_missing_artifact(tmp_path, tiny_folder):
    out = tmp_path / "bench"
    _fails_cleanly(run_cli("bench", str(tiny_folder), str(tmp_path / "nope"), "--out", str(out)), out, "does not exist")


def test_bench_missing_backend(tmp_path, tiny_folder):
    out = tmp_path / "bench"
    _fails_cleanly(run_cli("bench", str(tiny_folder), str(tiny_folder), "--backend", "tensorrt", "--out", str(out)), out, "TensorRT")
    _fails_cleanly(run_cli("bench", str(tiny_folder), str(tiny_folder), "--backend", "tvm", "--out", str(out)), out, "unknown backend 'tvm'")


def test_bench_vocabulary_mismatch(tmp_path, tiny_folder):
    other = tmp_path / "other"
    tiny_model("llama", vocab_size=256).save_pretrained(other)
    out = tmp_path / "bench"
    _fails_cleanly(run_cli("bench", str(tiny_folder), str(other), "--out", str(out)), out, "vocabulary of 256 tokens")


def test_bench_plan_with_unknown_method(tmp_path, tiny_folder):
    plan = tmp_path / "plan.txt"
    plan.write_text("dense\n2:4 obs\n")
    out = tmp_path / "bench"
    _fails_cleanly(run_cli("bench", str(tiny_folder), "--plan", str(plan), "--out", str(out)), out, "unknown method 'obs'")


def test_bench_ctrl_c_leaves_nothing(tmp_path, tiny_folder):
    out = tmp_path / "bench"
    proc = start_cli("bench", str(tiny_folder), str(tiny_folder), "--reps", "50", "--batch-sizes", "1",
                     "--prompt-lengths", "16", "--eval-windows", "0", "--no-peak-memory", "--out", str(out))
    for line in proc.stdout:  # one line per step when not on a terminal
        if line.startswith("rep "):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".bench*"))


# ---------------------------------------------------------------- GPU and TensorRT (skipped here, with the reason)

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except (ImportError, OSError):
    HAVE_TRT = False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: run by bench/studies/gpu_checks.sh on a GPU machine")
def test_bench_cuda_reports_the_semi_structured_linears(tmp_path, tiny_folder):
    packed = _packed_candidate(tiny_folder, tmp_path / "packed", save_dtype=torch.float16)
    out = tmp_path / "bench"
    r = run_cli("bench", str(tiny_folder), str(packed), "--device", "cuda", "--dtype", "float16", "--batch-sizes", "1,8",
                "--prompt-lengths", "64", "--decode-tokens", "2", "--reps", "2", "--eval-windows", "1", "--eval-seqlen", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert "semi-structured 2:4 kernels in 14/14 packed linears" in rows[1]["what_ran"]
    assert rows[1]["memory"]["cuda_max_allocated_bytes"] > 0 and "gpu" in json.loads((out / "bench.json").read_text())["machine"]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()), reason="needs TensorRT and an NVIDIA GPU (not installable on this project's machines)")
def test_bench_tensorrt_builds_and_reports_sparse_tactics(tmp_path, tiny_folder):
    out = tmp_path / "bench"
    r = run_cli("bench", str(tiny_folder), str(tiny_folder), "--backend", "tensorrt", "--device", "cuda", "--batch-sizes", "1",
                "--prompt-lengths", "64", "--decode-tokens", "2", "--reps", "2", "--eval-windows", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert all(row["what_ran"].startswith("TensorRT:") and row["target"].endswith(".plan") for row in rows)
