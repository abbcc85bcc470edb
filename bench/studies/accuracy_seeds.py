"""Are the differences between Thanos, SparseGPT and Wanda real? Seeds × methods on SmolLM2, scored by
perplexity and the two offline lm-eval tasks, with a paired test between methods.

    python bench/studies/accuracy_seeds.py [--seeds 5] [--limit N] [--patterns "unstructured:0.5;2:4"] [--extra FOLDER ...]

For each calibration seed (which Austen windows calibrate: `--seed` of compress), each method prunes
SmolLM2-135M at unstructured 50 % and at 2:4, and Thanos and Wanda prune it to width
`width:mlp=0.3,heads=0.33` (`--calibration`, default 32 x 512 tokens, one load and one calibration set per seed:
compare()). Every model gets perplexity on 16 x 512 tokens of Emma + Persuasion and accuracy on
austen_cloze and austen_next (the first `--limit` items of each, default all 500). Then per
pattern and metric: mean ± sd over seeds, and for each pair of methods the paired differences over
seeds with a two-sided paired t-test (scipy's ttest_rel; n = seeds). `--extra` adds artifacts
(a width model and its recovered one, say) scored once on the same windows and items.

Writes bench/results/accuracy-seeds.json and .md (the source of docs/accuracy.md's tables).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import ttest_rel

from thanos_deploy import data, loading, models, tasks
from thanos_deploy.compare import Run, compare
from thanos_deploy.evaluate import perplexity
from thanos_deploy.measure import machine, markdown_table, matmul_rate
from thanos_deploy.request import Calibration, Evaluation, Tasks

MODEL = "smollm2-135m"
PATTERNS = {"unstructured:0.5": ("thanos", "sparsegpt", "wanda"), "2:4": ("thanos", "sparsegpt", "wanda"),
            "width:mlp=0.3,heads=0.33": ("thanos", "wanda")}
TASKS = ("austen_cloze", "austen_next")
METRICS = (("perplexity", "perplexity", False), ("austen_cloze acc", ("austen_cloze", "acc"), True),
           ("austen_next acc", ("austen_next", "acc"), True), ("austen_next acc_norm", ("austen_next", "acc_norm"), True))


def value(row: dict, key) -> float:
    return row["perplexity"] if key == "perplexity" else row["tasks"][key[0]][key[1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="score the first N items of each task (default: all)")
    ap.add_argument("--patterns", default=";".join(PATTERNS), help="patterns to run, ;-separated (default: all three)")
    ap.add_argument("--calibration", default="32x512", help="calibration windows x tokens per seed")
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="artifacts scored once beside the seeds (e.g. a width model and its recovered one)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    nsamples, seqlen = (int(v) for v in args.calibration.split("x"))
    scored = Tasks(names=TASKS, limit=args.limit)
    evaluation = Evaluation(windows=16, seqlen=512)
    started = time.time()
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in args.extra:  # first: the short part
        model, tokenizer = loading.load(str(folder), dtype="float32")
        windows = data.windows(data.evaluation_tokens("austen", tokenizer), models.context_length(model, 512), 16)
        row = {"label": folder.name, "method": "extra", "seed": None, "study_pattern": "extra",
               **perplexity(model, windows), "tasks": tasks.run(model, tokenizer, list(TASKS), limit=args.limit)}
        rows.append(row)
        print(f"{row['label']}: ppl {row['perplexity']:.3f}  " + "  ".join(f"{t} {row['tasks'][t]['acc']:.3f}" for t in TASKS), flush=True)
    for seed in range(args.seeds):
        for pattern in args.patterns.split(";"):
            methods = PATTERNS[pattern]
            runs = ([Run("dense")] if not any(r["method"] == "dense" for r in rows) else []) + [Run(m) for m in methods]
            for row in compare(MODEL, runs, pattern, calibration=Calibration(nsamples=nsamples, seqlen=seqlen, seed=seed), evaluation=evaluation,
                               scored=scored):
                rows.append({**row, "seed": seed, "study_pattern": pattern})
                (args.out / "accuracy-seeds.partial.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")  # a long study keeps what it has
                print(f"seed {seed} {pattern:26s} {row['label']:10s} ppl {row['perplexity']:8.3f}  "
                      + "  ".join(f"{t} {row['tasks'][t]['acc']:.3f}" for t in TASKS) + f"  ({time.time() - started:.0f} s)", flush=True)
    summary = summarize(rows, args.seeds, args.patterns.split(";"))
    result = {"machine": {**machine(), "matmul_gflops": matmul_rate() / 1e9}, "seeds": args.seeds, "limit": args.limit,
              "calibration": f"austen, {nsamples} x {seqlen} per seed", "evaluation": "austen, 16 x 512", "seconds": round(time.time() - started),
              "rows": rows, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy-seeds.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = render(result)
    (args.out / "accuracy-seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def summarize(rows: list[dict], seeds: int, patterns: list[str]) -> dict:
    """Per pattern: mean ± sd of each metric per method over seeds, and paired tests between methods."""
    out = {}
    for pattern in patterns:
        methods = PATTERNS[pattern]
        of = {m: sorted((r for r in rows if r["study_pattern"] == pattern and r["method"] == m), key=lambda r: r["seed"]) for m in methods}
        stats = {m: {name: {"mean": statistics.fmean(v := [value(r, key) for r in of[m]]), "sd": statistics.stdev(v) if len(v) > 1 else 0.0}
                     for name, key, _ in METRICS} for m in methods}
        tests = []
        for a, b in itertools.combinations(methods, 2):
            for name, key, higher in METRICS:
                x, y = [value(r, key) for r in of[a]], [value(r, key) for r in of[b]]
                diffs = [u - v for u, v in zip(x, y)]
                p = float(ttest_rel(x, y).pvalue) if len(x) > 1 and any(diffs) else 1.0
                mean = statistics.fmean(diffs)
                better = "tie" if mean == 0 else a if (mean > 0) == higher else b
                tests.append({"a": a, "b": b, "metric": name, "mean_difference": statistics.fmean(diffs), "sd_difference":
                              statistics.stdev(diffs) if len(diffs) > 1 else 0.0, "p": p, "better": better,
                              "better_in_seeds": sum((d > 0) == higher for d in diffs if d != 0)})
        out[pattern] = {"stats": stats, "tests": tests}
    return out


def render(result: dict) -> list[str]:
    rows, summary = result["rows"], result["summary"]
    dense = next(r for r in rows if r["method"] == "dense")
    items = "all items" if result["limit"] is None else f"the first {result['limit']} items"
    lines = [f"SmolLM2-135M, {result['seeds']} calibration seeds, calibration {result['calibration']}, evaluation {result['evaluation']}, "
             f"tasks on {items}; "
             f"{result['seconds'] / 60:.0f} minutes at {result['machine']['matmul_gflops']:.0f} GFLOP/s.", "",
             f"Dense: perplexity {dense['perplexity']:.3f}, " + ", ".join(f"{t} acc {dense['tasks'][t]['acc']:.3f} ± {dense['tasks'][t]['acc_stderr']:.3f}"
                                                             for t in TASKS) + f", austen_next acc_norm {dense['tasks']['austen_next']['acc_norm']:.3f}", ""]
    for pattern, s in summary.items():
        lines += [f"### {pattern}", ""]
        lines += markdown_table(["method", *[m for m, _, _ in METRICS]],
                                [[m, *[f"{v[n]['mean']:.3f} ± {v[n]['sd']:.3f}" for n, _, _ in METRICS]] for m, v in s["stats"].items()])
        lines += ["", "Paired over seeds (a − b, two-sided paired t-test):", ""]
        lines += markdown_table(["a − b", "metric", "mean difference ± sd", "p", "better", "seeds where better"],
                                [[f"{t['a']} − {t['b']}", t["metric"], f"{t['mean_difference']:+.4f} ± {t['sd_difference']:.4f}", f"{t['p']:.3f}",
                                  t["better"], f"{t['better_in_seeds']}/{result['seeds']}"] for t in s["tests"]])
        lines.append("")
    extra = [r for r in rows if r["method"] == "extra"]
    if extra:
        lines += ["### Width and recovered (one calibration seed)", ""]
        lines += markdown_table(["model", "perplexity", *[f"{t} acc" for t in TASKS], "austen_next acc_norm"],
                                [[r["label"], f"{r['perplexity']:.3f}", *[f"{r['tasks'][t]['acc']:.3f} ± {r['tasks'][t]['acc_stderr']:.3f}" for t in TASKS],
                                  f"{r['tasks']['austen_next']['acc_norm']:.3f}"] for r in extra])
    return lines


if __name__ == "__main__":
    main()
