"""Thanos's block size B and outlier fraction α against perplexity and pruning time, on SmolLM2.

    python bench/studies/tradeoffs.py                        # 64 × 512 calibration windows (Austen, seed 0), 64 × 512 evaluation
    python bench/studies/tradeoffs.py --quick --model DIR    # 8 × 128 calibration, 4 × 128 evaluation, 3 values each: a check

(a) B ∈ {32, 64, 128, 256, 512, 1024} at α = 0 for 2:4 and unstructured:0.5; (b) α ∈ {0, 0.01, 0.02,
0.05, 0.1, 0.2} at B = 512 (the default) for structured:0.3 and 2:4; SparseGPT and Wanda per pattern as
references, dense once. A configuration in both studies (2:4, B = 512, α = 0) runs once. The full
study is 30 runs, over an hour on two CPU cores.

Writes bench/results/tradeoffs[-quick].json after every finished run; run the same command again to
continue after an interruption (runs already in the JSON are skipped; --fresh starts over). Then
tradeoffs[-quick].md and one PNG per pattern (perplexity against pruning seconds, and against the
achieved zero fraction where α varies), and prints, for each pattern of (a), every B's perplexity
relative to B = 512 and the smallest B at most 0.5 % above it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

from thanos_deploy import loading, plots
from thanos_deploy.artifact import replacing
from thanos_deploy.compare import Run, compare, describe, document, expand_grid, table
from thanos_deploy.console import RichReporter, console
from thanos_deploy.errors import UserError
from thanos_deploy.measure import markdown_table
from thanos_deploy.methods import get_method
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.request import Calibration, Evaluation, Execution

FULL = {"block_sizes": [32, 64, 128, 256, 512, 1024], "alphas": [0, 0.01, 0.02, 0.05, 0.1, 0.2],
        "nsamples": 64, "seqlen": 512, "eval_windows": 64, "eval_seqlen": 512}
QUICK = {"block_sizes": [32, 128, 512], "alphas": [0, 0.05, 0.1], "nsamples": 8, "seqlen": 128, "eval_windows": 4, "eval_seqlen": 128}
BLOCK_PATTERNS = ("2:4", "unstructured:0.5")  # study (a): B at α = 0
ALPHA_PATTERNS = ("structured:0.3", "2:4")  # study (b): α at the default B
DEFAULT_B = 512
TOLERANCE = 0.005


def configuration(pattern: str | None, method: str, options: dict) -> tuple:
    """What decides a run's result: pattern, method and every option with defaults filled in, so a
    B = 512 written out and one implied are the same run."""
    if method == "dense":
        return ("dense",)
    return (pattern, method, tuple(sorted(get_method(method).options(parse_pattern(pattern), options).items())))


def study(block_sizes: list[int], alphas: list[float]) -> dict[str, list[Run]]:
    """The runs of each pattern, as compare grids, every configuration once."""
    values = lambda xs: "|".join(f"{x:g}" for x in xs)  # noqa: E731
    specs: dict[str, list[str]] = {}
    for pattern in BLOCK_PATTERNS:
        specs.setdefault(pattern, []).append(f"thanos:block_size={values(block_sizes)},alpha=0")
    for pattern in ALPHA_PATTERNS:
        specs.setdefault(pattern, []).append(f"thanos:block_size={DEFAULT_B},alpha={values(alphas)}")
    plan = {}
    for pattern, grids in specs.items():
        runs: dict[tuple, Run] = {}
        for spec in [*grids, "sparsegpt", "wanda"]:
            for run in expand_grid(spec):
                runs.setdefault(configuration(pattern, run.method, run.options), run)
        plan[pattern] = list(runs.values())
    return plan


def earlier_rows(path: Path, protocol: dict, fresh: bool) -> tuple[list[dict], float]:
    """Rows and seconds of an unfinished study with the same protocol, to continue it."""
    if fresh or not path.is_file():
        return [], 0.0
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"'{path}' is not valid JSON: pass --fresh to start the study over") from None
    if earlier.get("protocol") != protocol:
        changed = ", ".join(k for k in protocol if earlier.get("protocol", {}).get(k) != protocol[k])
        raise UserError(f"'{path}' holds a study with another {changed}: pass --fresh to start over, or another --out")
    return earlier["rows"], earlier["seconds"]


def block_size_lines(rows: list[dict], pattern: str) -> list[str]:
    """Each B's perplexity relative to B = 512 at α = 0, and the smallest B at most 0.5 % above it."""
    ppl = {r["options"]["block_size"]: r["perplexity"] for r in rows
           if r["pattern"] == pattern and r["method"] == "thanos" and r["options"]["alpha"] == 0}
    if DEFAULT_B not in ppl:
        return [f"{pattern}: no B={DEFAULT_B} run to compare with"]
    reference = ppl[DEFAULT_B]
    relative = ", ".join(f"B={b} {ppl[b] / reference:.4f}" for b in sorted(ppl))
    smallest = min(b for b in ppl if ppl[b] <= reference * (1 + TOLERANCE))
    return [f"{pattern}: perplexity relative to B={DEFAULT_B} ({reference:.3f}): {relative}",
            f"{pattern}: smallest B at most {TOLERANCE:.1%} above B={DEFAULT_B}: {smallest} ({ppl[smallest]:.3f})"]


def run_study(args: argparse.Namespace) -> None:
    settings = QUICK if args.quick else FULL
    plan = study(settings["block_sizes"], settings["alphas"])
    stem = "tradeoffs-quick" if args.quick else "tradeoffs"
    path = args.out / f"{stem}.json"
    protocol = {"model": args.model, "patterns": list(plan), "calib": "austen", "nsamples": settings["nsamples"], "seqlen": settings["seqlen"],
                "seed": 0, "eval_data": "austen", "eval_seqlen": settings["eval_seqlen"], "eval_windows": settings["eval_windows"],
                "device": args.device, "block_sizes": settings["block_sizes"], "alphas": settings["alphas"]}
    rows, seconds_before = earlier_rows(path, protocol, args.fresh)
    done = {configuration(r["pattern"], r["method"], r["options"]) for r in rows}
    command = "python " + shlex.join(sys.argv)
    started = time.perf_counter()

    def save(row: dict) -> None:
        rows.append(row)
        result = document(rows, protocol, command=command, seconds=seconds_before + time.perf_counter() - started)
        with replacing(path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        timing = f"  pruning math {row['prune_seconds']:.1f} s  total {row['seconds']:.1f} s" if row["seconds"] is not None else ""
        console.print(f"  ppl {row['perplexity']:.3f}  sparsity {row['sparsity']:.3f}{timing}", highlight=False)

    if rows:
        console.print(f"continuing {path}: {len(rows)} runs done", highlight=False)
    common = dict(calibration=Calibration(nsamples=protocol["nsamples"], seqlen=protocol["seqlen"]),
                  evaluation=Evaluation(windows=protocol["eval_windows"], seqlen=protocol["eval_seqlen"]), execution=Execution(device=args.device))
    for pattern, runs in [(None, [Run("dense")]), *plan.items()]:
        todo = [run for run in runs if configuration(pattern, run.method, run.options) not in done]
        if todo:  # dense ignores the pattern compare requires
            with RichReporter() as reporter:
                compare(args.model, todo, pattern or "2:4", on_result=save, reporter=reporter, **common)

    result = json.loads(path.read_text())
    dense = [r for r in rows if r["method"] == "dense"]
    lines = [describe(result), ""]
    for pattern in plan:
        mine = dense + [r for r in rows if r["pattern"] == pattern]
        header, cells = table(mine)
        lines += [f"### {pattern}", "", *markdown_table(header, cells), ""]
        with replacing(args.out / f"{stem}-{pattern.replace(':', '-')}.png") as tmp:
            plots.tradeoffs(mine, tmp, f"{args.model} · {pattern} · calibration {protocol['nsamples']}×{protocol['seqlen']}")
        if pattern in BLOCK_PATTERNS:
            summary = block_size_lines(rows, pattern)
            console.print("\n".join(summary), highlight=False)
            lines += [*summary, ""]
    with replacing(args.out / f"{stem}.md") as tmp:
        tmp.write_text("\n".join(lines))
    console.print(f"wrote {path}, {stem}.md and {len(plan)} PNGs ({stem}-PATTERN.png) in {args.out}", highlight=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small protocol and three values of B and α: checks the script end to end")
    ap.add_argument("--model", default=loading.SMOLLM2_ALIAS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    ap.add_argument("--fresh", action="store_true", help="start over instead of continuing the study in the JSON")
    args = ap.parse_args()
    transformers.logging.disable_progress_bar()
    try:
        run_study(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
