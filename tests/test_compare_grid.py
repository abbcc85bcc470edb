"""`compare` sweeps: the grid syntax of --methods, plan files, the Pareto front in both directions,
and a sweep end to end on a tiny model writing JSON, Markdown and a PNG."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from thanos_deploy.bench.plan import parse_plan
from thanos_deploy.compare import Run, expand_grid, parse_methods
from thanos_deploy.errors import UserError
from thanos_deploy.plots import pareto_front

from .conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- grid syntax


def test_the_issues_grid_is_the_cartesian_product_next_to_plain_specs():
    runs = parse_methods("thanos:block_size=32|128|512,alpha=0|0.05|0.1,sparsegpt,wanda,dense")
    grid = [(r.options["block_size"], r.options["alpha"]) for r in runs[:9]]
    assert grid == [(b, a) for b in (32, 128, 512) for a in (0, 0.05, 0.1)]  # last option fastest
    assert all(r.method == "thanos" and isinstance(r.options["block_size"], int) for r in runs[:9])
    assert [r.method for r in runs[9:]] == ["sparsegpt", "wanda", "dense"]
    assert runs[1].label == "thanos block_size=32 alpha=0.05"


def test_specs_of_earlier_versions_read_as_before():
    runs = parse_methods("dense,wanda,sparsegpt,thanos,thanos:alpha=0.1")
    assert runs == [Run("dense"), Run("wanda"), Run("sparsegpt"), Run("thanos"), Run("thanos", {"alpha": 0.1})]
    assert parse_methods(" thanos:alpha=0.1:block_size=128 ") == [Run("thanos", {"alpha": 0.1, "block_size": 128})]


def test_options_may_be_separated_by_colons_or_commas():
    colons = parse_methods("thanos:block_size=64|128:alpha=0|0.1")
    assert parse_methods("thanos:block_size=64|128,alpha=0|0.1") == colons
    assert parse_methods("thanos,block_size=64|128,alpha=0|0.1") == colons
    assert len(colons) == 4
    assert expand_grid("Thanos:block-size=64") == [Run("thanos", {"block_size": 64})]


def test_a_plan_file_holds_specs_and_comments(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("# the B sweep\nthanos:block_size=32|64,alpha=0   # two runs\n\nsparsegpt, wanda\ndense\n")
    assert [r.label for r in parse_methods(f"@{plan}")] == [
        "thanos block_size=32 alpha=0", "thanos block_size=64 alpha=0", "sparsegpt", "wanda", "dense"]
    plan.write_text("wanda\nthanos:alpha=0||0.1\n")
    with pytest.raises(UserError, match=r"plan.txt' line 2: bad method spec 'thanos:alpha=0\|\|0.1'"):
        parse_methods(f"@{plan}")


@pytest.mark.parametrize("methods, problem, fix", [
    ("thanos:alpha=", "alpha has no value", "write alpha=VALUE"),
    ("thanos:alpha=0|x", "alpha: 'x' is not a number", "option values are numbers"),
    ("thanos:alpha=inf", "alpha: 'inf' is not a number", "option values are numbers"),
    ("thanos:beta=1|2", "method 'thanos' does not take option(s) beta", "it takes block_size, row_batch, percdamp, alpha"),
    ("wanda,obs:alpha=1", "unknown method 'obs'", "choose dense, thanos, sparsegpt, wanda, magnitude"),
    ("thanos:alpha=1||2", "alpha=1||2 has an empty value", "single '|'"),
    ("thanos:alpha=|1", "alpha=|1 has an empty value", "single '|'"),
    ("thanos:alpha=0,alpha=0.1", "alpha is given twice", "list its values once"),
    ("thanos:alpha", "'alpha' is not key=value", "write options as key=value"),
    ("thanos:", "an option is empty", "write options as key=value"),
    ("dense:alpha=0|1", "dense takes no options", "write dense alone"),
    ("alpha=0.1,thanos", "starts with the option 'alpha=0.1'", "e.g. thanos:alpha=0.1"),
    ("thanos:alpha=0|0", "lists thanos alpha=0 more than once", "list each run once"),
    (" , ", "names no run", "e.g. dense,wanda,thanos"),
])
def test_a_bad_grid_names_the_problem_and_the_fix(methods, problem, fix):
    with pytest.raises(UserError) as caught:
        parse_methods(methods)
    message = str(caught.value)
    assert problem in message and fix in message and "\n" not in message


def test_a_missing_plan_file_is_one_error(tmp_path):
    with pytest.raises(UserError, match="does not exist: pass --methods @FILE"):
        parse_methods(f"@{tmp_path / 'none.txt'}")


def test_bench_plans_take_grids_too():
    labels = [r.label for r in parse_plan("2:4 thanos:alpha=0|0.1\nstructured:0.3 wanda\n")]
    assert labels == ["dense", "2:4 thanos alpha=0", "2:4 thanos alpha=0.1", "structured:0.3 wanda"]
    with pytest.raises(UserError, match="--alpha must be in"):
        parse_plan("2:4 thanos:alpha=0|0.7\n")  # every value is checked against the pattern


# ---------------------------------------------------------------- Pareto front


def test_pareto_front_with_lower_x_better():
    points = [(10.0, 50.0), (2.0, 60.0), (5.0, 50.0), (1.0, 80.0), (5.0, 70.0), (20.0, 45.0)]  # (seconds, perplexity)
    # (10, 50) is beaten by (5, 50) (as good, faster); (5, 70) by (2, 60)
    assert pareto_front(points, x_better="lower") == [3, 1, 2, 5]


def test_pareto_front_with_higher_x_better():
    points = [(0.5, 60.0), (0.45, 55.0), (0.5, 62.0), (0.4, 58.0), (0.3, 50.0)]  # (zero fraction, perplexity)
    # (0.5, 62) is beaten by (0.5, 60); (0.4, 58) by (0.45, 55)
    assert pareto_front(points, x_better="higher") == [4, 1, 0]
    assert pareto_front([(1.0, 5.0)], x_better="higher") == [0]


# ---------------------------------------------------------------- the study script


def _tradeoffs():
    path = Path(__file__).parents[1] / "bench" / "studies" / "tradeoffs.py"
    spec = importlib.util.spec_from_file_location("tradeoffs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_study_runs_each_configuration_once():
    tradeoffs = _tradeoffs()
    plan = tradeoffs.study(tradeoffs.FULL["block_sizes"], tradeoffs.FULL["alphas"])
    assert {p: len(runs) for p, runs in plan.items()} == {"2:4": 6 + 6 - 1 + 2, "unstructured:0.5": 6 + 2, "structured:0.3": 6 + 2}
    two_four = [r.label for r in plan["2:4"]]
    assert two_four.count("thanos block_size=512 alpha=0") == 1 and "thanos block_size=512 alpha=0.2" in two_four
    assert two_four[-2:] == ["sparsegpt", "wanda"]
    # written out or implied, B = 512 is the same configuration
    assert tradeoffs.configuration("2:4", "thanos", {"alpha": 0}) == tradeoffs.configuration("2:4", "thanos", {"block_size": 512, "alpha": 0.0})


def test_the_study_refuses_to_continue_another_protocol(tmp_path):
    (tmp_path / "tradeoffs-quick.json").write_text(json.dumps({"protocol": {"model": "other"}, "rows": [], "seconds": 0}))
    script = Path(__file__).parents[1] / "bench" / "studies" / "tradeoffs.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--model", "mine", "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--fresh" in r.stderr and "model" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tradeoffs-quick.json"]


# ---------------------------------------------------------------- end to end


def test_a_sweep_writes_json_markdown_and_a_plot(tmp_path, tiny_folder):
    out = tmp_path / "sweep"
    r = run_cli("compare", str(tiny_folder), "--pattern", "2:4", "--methods", "thanos:block_size=32|64,alpha=0|0.1,sparsegpt,wanda,dense",
                "--nsamples", "2", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "run 1 of 7: thanos block_size=32 alpha=0" in r.stdout and "run 7 of 7: dense" in r.stdout
    result = json.loads((out / "compare.json").read_text())
    rows = result["rows"]
    assert [row["label"] for row in rows] == ["thanos block_size=32 alpha=0", "thanos block_size=32 alpha=0.1", "thanos block_size=64 alpha=0",
                                             "thanos block_size=64 alpha=0.1", "sparsegpt", "wanda", "dense"]
    assert [(row["options"]["block_size"], row["options"]["alpha"]) for row in rows[:4]] == [(32, 0), (32, 0.1), (64, 0), (64, 0.1)]
    for row in rows[:6]:
        assert row["pattern"] == "2:4" and row["perplexity"] > 1 and row["seconds"] >= row["prune_seconds"] >= 0
    assert rows[0]["sparsity"] == pytest.approx(0.5, abs=1e-6) and rows[1]["sparsity"] < 0.49  # α = 0.1 keeps dense rows
    assert rows[-1]["prune_seconds"] is None and rows[-1]["sparsity"] == 0
    protocol = result["protocol"]
    assert (protocol["pattern"], protocol["nsamples"], protocol["seqlen"], protocol["eval_windows"], protocol["seed"]) == ("2:4", 2, 32, 2, 0)
    assert result["machine"]["versions"]["torch"] and result["seconds"] > 0
    assert result["command"].startswith("thanos-deploy compare") and "'thanos:block_size=32|64,alpha=0|0.1,sparsegpt,wanda,dense'" in result["command"]
    md = (out / "compare.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(table_rows) == 7 and table_rows[0].startswith("| thanos block_size=32 alpha=0 |")
    blob = (out / "compare.png").read_bytes()
    assert blob[:8] == PNG_SIGNATURE and len(blob) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no temporary folder left
