"""Are the differences between Thanos, SparseGPT and Wanda real? Seeds × methods on SmolLM2, scored by
perplexity and the two offline lm-eval tasks, with a paired test between methods.

    python bench/studies/accuracy_seeds.py [--seeds 5] [--limit N] [--patterns "unstructured:0.5;2:4"] [--extra FOLDER ...]
    python bench/studies/accuracy_seeds.py --merge A/accuracy-seeds.json B/accuracy-seeds.json   # runs of one protocol, summarized together

For each calibration seed (which Austen windows calibrate: `--seed` of compress), each method prunes
SmolLM2-135M at unstructured 50 % and at 2:4, and Thanos and Wanda prune it to width
`width:mlp=0.3,heads=0.33,multiple=256`, the README's width model (`--calibration`, default 32 x 512 tokens, one load and one calibration set per seed:
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
            "width:mlp=0.3,heads=0.33,multiple=256": ("thanos", "wanda")}
TASKS = ("austen_cloze", "austen_next")
METRICS = (("perplexity", "perplexity", False), ("austen_cloze acc", ("austen_cloze", "acc"), True),
           ("austen_cloze word perplexity", ("austen_cloze", "perplexity"), False),  # the probability behind the cloze's top-1 test
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
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="summarize earlier runs' accuracy-seeds.json together instead of running")
    args = ap.parse_args()
    if args.merge:
        if missing := [str(f) for f in args.merge if not f.is_file()]:
            ap.error(f"--merge: no such file {', '.join(missing)}; pass the accuracy-seeds.json of earlier runs")
        return publish(merge([json.loads(f.read_text()) for f in args.merge]), args.out)
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
    publish({"machine": {**machine(), "matmul_gflops": matmul_rate() / 1e9}, "limit": args.limit,
             "calibration": f"austen, {nsamples} x {seqlen} per seed", "evaluation": "austen, 16 x 512", "seconds": round(time.time() - started),
             "rows": rows}, args.out)


def merge(results: list[dict]) -> dict:
    """Several runs as one (say the sparsity patterns and a later width run): same protocol, one dense row, seconds added."""
    first = results[0]
    for other in results[1:]:
        if any(other[k] != first[k] for k in ("limit", "calibration", "evaluation")):
            raise SystemExit("--merge: the runs differ in limit, calibration or evaluation; merge runs of one protocol")
    rows = [r for result in results for r in result["rows"]]
    dense = next(r for r in rows if r["method"] == "dense")
    return {**first, "seconds": sum(r["seconds"] for r in results), "rows": [r for r in rows if r["method"] != "dense" or r is dense]}


def publish(result: dict, out: Path) -> None:
    result = {**result, "summary": summarize(result["rows"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy-seeds.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = render(result)
    (out / "accuracy-seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def summarize(rows: list[dict]) -> dict:
    """Per pattern: mean ± sd of each metric per method over seeds, and paired tests between methods (pairs share a seed)."""
    out = {}
    for pattern in dict.fromkeys(r["study_pattern"] for r in rows if r["method"] not in ("dense", "extra")):
        methods = PATTERNS[pattern]
        of = {m: sorted((r for r in rows if r["study_pattern"] == pattern and r["method"] == m), key=lambda r: r["seed"]) for m in methods}
        seeds = len(of[methods[0]])
        if any([r["seed"] for r in of[m]] != [r["seed"] for r in of[methods[0]]] for m in methods):
            raise SystemExit(f"{pattern}: the methods were not run on the same seeds; a paired test needs them")
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
                              "better_in_seeds": sum(((d > 0) == higher) == (better == a) for d in diffs if d != 0)})  # seeds the better one led
        out[pattern] = {"seeds": seeds, "stats": stats, "tests": tests}
    return out


def render(result: dict) -> list[str]:
    rows, summary = result["rows"], result["summary"]
    dense = next(r for r in rows if r["method"] == "dense")
    items = "all items" if result["limit"] is None else f"the first {result['limit']} items"
    seeds = ", ".join(f"{s['seeds']} for {pattern}" for pattern, s in summary.items())
    lines = [f"SmolLM2-135M, calibration seeds: {seeds}; calibration {result['calibration']}, evaluation {result['evaluation']}, "
             f"tasks on {items}; "
             f"{result['seconds'] / 60:.0f} minutes at {result['machine']['matmul_gflops']:.0f} GFLOP/s.", "",
             f"Dense: perplexity {dense['perplexity']:.3f}, " + ", ".join(f"{t} acc {dense['tasks'][t]['acc']:.3f} ± {dense['tasks'][t]['acc_stderr']:.3f}"
                                                             for t in TASKS) + f", austen_next acc_norm {dense['tasks']['austen_next']['acc_norm']:.3f}", ""]
    for pattern, s in summary.items():
        lines += [f"### {pattern}", ""]
        lines += markdown_table(["method", *[m for m, _, _ in METRICS]],
                                [[m, *[f"{v[n]['mean']:.3f} ± {v[n]['sd']:.3f}" for n, _, _ in METRICS]] for m, v in s["stats"].items()])
        lines += ["", "Paired over seeds (a − b, two-sided paired t-test):", ""]
        lines += markdown_table(["a − b", "metric", "mean difference ± sd", "p", "better", "seeds it led"],
                                [[f"{t['a']} − {t['b']}", t["metric"], f"{t['mean_difference']:+.4f} ± {t['sd_difference']:.4f}", f"{t['p']:.3f}",
                                  t["better"], f"{t['better_in_seeds']}/{s['seeds']}"] for t in s["tests"]])
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
