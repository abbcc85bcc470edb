"""Task accuracy through lm-evaluation-harness: the offline Austen tasks are built the same every
time from the evaluation novels only, `eval --tasks` runs on any artifact, and lm-eval's own command
line on a plain folder gives the same numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from thanos_deploy import austen, tasks

from .conftest import run_cli


def test_the_offline_tasks_build_the_same_items_twice_from_the_evaluation_novels_only():
    novels = austen.novels()
    for task in tasks.OFFLINE:
        first = tasks.items(task)
        tasks.items.cache_clear()
        assert tasks.items(task) == first and len(first) >= 500
        assert {item["novel"] for item in first} == set(austen.EVALUATION)
    for item in tasks.items("austen_cloze"):
        word = item["target"]
        assert len(word) >= 3 and word.lower() not in tasks.STOP_WORDS and word in re.findall(r"[A-Za-z]+", item["context"])
        assert 40 <= len(item["context"].split()) <= tasks.CLOZE_WORDS
    for item in tasks.items("austen_next"):
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        assert item["choices"][item["label"]] in " ".join(novels[item["novel"]].replace("_", "").split())
    calibration = austen.text("calibration")
    assert not any(item["context"][:60] in calibration for item in tasks.items("austen_cloze")[:50])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_folder) -> dict:
    root = tmp_path_factory.mktemp("task-artifacts")
    made = {"plain": tiny_folder}
    for name, flags in (("packed", ["--pattern", "2:4", "--pack"]), ("shrunk", ["--pattern", "structured:0.25", "--shrink"])):
        r = run_cli("compress", str(tiny_folder), "--method", "wanda", *flags, "--nsamples", "2", "--seqlen", "32", "--out", str(root / name))
        assert r.returncode == 0, r.stderr
        made[name] = root / name
    return made


@pytest.mark.parametrize("storage", ["plain", "packed", "shrunk"])
def test_eval_tasks_on_an_artifact_gives_each_metric_with_its_standard_error(artifacts, storage):
    r = run_cli("eval", str(artifacts[storage]), "--tasks", "austen_cloze,austen_next", "--limit", "6", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)["tasks"]
    assert set(result) == {"austen_cloze", "austen_next"}
    for metric in ("acc", "acc_norm"):
        assert 0 <= result["austen_next"][metric] <= 1 and result["austen_next"][f"{metric}_stderr"] >= 0
    assert 0 <= result["austen_cloze"]["acc"] <= 1 and result["austen_next"]["samples"] == 6


def test_lm_evals_own_command_line_gives_the_same_accuracy_on_a_plain_folder(tmp_path, artifacts):
    ours = run_cli("eval", str(artifacts["plain"]), "--tasks", "austen_next", "--limit", "12", "--json")
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={artifacts['plain']}",
                             "--tasks", "austen_next", "--include_path", str(tasks.FOLDER), "--limit", "12", "--batch_size", "8",
                             "--device", "cpu", "--output_path", str(tmp_path / "lm-eval")], capture_output=True, text=True, timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    written = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())["results"]["austen_next"]
    mine = json.loads(ours.stdout)["tasks"]["austen_next"]
    assert written["acc,none"] == mine["acc"] and written["acc_norm,none"] == mine["acc_norm"]


# ---------------------------------------------------------------- the seeds study's statistics


def _accuracy_seeds():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("accuracy_seeds", Path(__file__).parents[1] / "bench" / "studies" / "accuracy_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, seed, perplexity, cloze, pattern="2:4"):
    metrics = {"austen_cloze": {"acc": cloze, "perplexity": 2 * perplexity}, "austen_next": {"acc": 0.3, "acc_norm": 0.3}}
    return {"method": method, "seed": seed, "study_pattern": pattern, "perplexity": perplexity, "tasks": metrics}


def test_the_seeds_study_pairs_methods_by_seed_and_says_which_is_better():
    study = _accuracy_seeds()
    # thanos − sparsegpt perplexity differences -1, -2, -3: mean -2, sd 1, t = -2√3 on 2 degrees of freedom,
    # whose two-sided p is 1 − |t|/√(2 + t²) in closed form; cloze differences -0.01, +0.02, -0.04
    rows = [_row("dense", None, 30, 0.5)]
    for seed, (t, s, w) in enumerate([(40, 41, 90), (41, 43, 95), (42, 45, 99)]):
        rows += [_row("thanos", seed, t, 0.40 - (0.01, -0.02, 0.04)[seed]), _row("sparsegpt", seed, s, 0.40), _row("wanda", seed, w, 0.30 + seed / 100)]
    summary = study.summarize(rows)["2:4"]
    assert summary["seeds"] == 3 and summary["stats"]["sparsegpt"]["perplexity"] == {"mean": 43.0, "sd": 2.0}
    test = {(t["a"], t["b"], t["metric"]): t for t in summary["tests"]}
    ppl = test["thanos", "sparsegpt", "perplexity"]
    t_stat = -2 * 3 ** 0.5
    assert ppl["mean_difference"] == -2.0 and ppl["sd_difference"] == 1.0
    assert ppl["p"] == pytest.approx(1 - abs(t_stat) / (2 + t_stat**2) ** 0.5, rel=1e-9)
    assert ppl["better"] == "thanos" and ppl["better_in_seeds"] == 3  # lower perplexity is better
    cloze = test["thanos", "sparsegpt", "austen_cloze acc"]
    assert cloze["better"] == "sparsegpt" and cloze["better_in_seeds"] == 2  # higher accuracy is better; sparsegpt led in seeds 0 and 2
    assert test["thanos", "sparsegpt", "austen_next acc"]["better"] == "tie" and test["thanos", "sparsegpt", "austen_next acc"]["p"] == 1.0
    with pytest.raises(SystemExit, match="same seeds"):
        study.summarize([r for r in rows if not (r["method"] == "wanda" and r["seed"] == 1)])


def test_the_seeds_study_merges_runs_of_one_protocol_only():
    study = _accuracy_seeds()
    protocol = {"machine": {}, "limit": 200, "calibration": "austen, 16 x 512 per seed", "evaluation": "austen, 16 x 512"}
    a = {**protocol, "seconds": 10, "rows": [_row("dense", None, 30, 0.5), _row("thanos", 0, 40, 0.4)]}
    b = {**protocol, "seconds": 5, "rows": [_row("dense", None, 30, 0.5), _row("thanos", 0, 50, 0.3, pattern="width")]}
    merged = study.merge([a, b])
    assert merged["seconds"] == 15 and [r["method"] for r in merged["rows"]] == ["dense", "thanos", "thanos"]
    with pytest.raises(SystemExit, match="one protocol"):
        study.merge([a, {**b, "limit": 100}])
