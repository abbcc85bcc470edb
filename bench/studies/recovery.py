"""Recovering quality after pruning: perplexity against tokens and wall-clock, on SmolLM2.

    python bench/studies/recovery.py                      # every run, recover's default budget
    python bench/studies/recovery.py --only thanos-2:4    # one run
    python bench/studies/recovery.py --tokens 32768       # a shorter budget

Each run prunes SmolLM2-135M with 64 × 512 Austen calibration windows (seed 0) into its deployable
storage (2:4 packed, structured shrunk, width plain), then runs `recover` with its defaults (the
dense model as teacher, 4 × 256-token windows of the calibration split, AdamW 1e-4, evaluated on
8 × 512 windows of Emma + Persuasion every eighth of the budget). Dense, pruned and recovered are then
scored on the quality protocol's 64 × 512 evaluation windows; the gap closed is
(pruned − recovered) / (pruned − dense). The machine's float32 matmul rate is printed with the result.
Writes bench/results/recovery.json, recovery.md and recovery.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from thanos_deploy import loading, oneshot
from thanos_deploy.measure import markdown_table, matmul_rate
from thanos_deploy.plots import recovery_curves
from thanos_deploy.progress import Reporter
from thanos_deploy.recovery import recover
from thanos_deploy.request import DEFAULT_TOKENS, RECOVER_EVALUATION, Evaluation, Output, RecoverRequest, Training, prepare
from thanos_deploy.scores import evaluate_model

RUNS = {
    "thanos-2:4": ("2:4", "thanos", {"alpha": 0.0}),
    "sparsegpt-2:4": ("2:4", "sparsegpt", {}),
    "thanos-width": ("width:intermediate_size=1050,num_attention_heads=6", "thanos", {}),
    "thanos-structured:0.3": ("structured:0.3", "thanos", {"alpha": 0.0}),
}


class Progress(Reporter):
    """Each evaluation of a run as one line."""

    def __init__(self, name: str):
        self.name = name

    def record(self, kind: str, values: dict) -> None:
        if kind == "recover.evaluation":
            print(f"  {self.name}: {values['tokens']:>7} tokens {values['seconds']:7.0f} s  ppl {values['perplexity']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to do (default: all)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"recovery budget (default {DEFAULT_TOKENS}, recover's default)")
    ap.add_argument("--check", action="store_true", help="a smoke test: 4 × 128 calibration, 4 evaluation windows, 2 steps")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    calibration = dict(nsamples=4, seqlen=128) if args.check else dict(nsamples=64, seqlen=512)
    evaluation = dict(source="austen", seqlen=512, max_windows=4 if args.check else 64)
    training, scoring = (Training(tokens=2048), Evaluation(windows=2)) if args.check else (Training(tokens=args.tokens), RECOVER_EVALUATION)
    rate = matmul_rate()
    print(f"float32 matmul rate {rate / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads", flush=True)
    dense = evaluate_model(loading.SMOLLM2_ALIAS, **evaluation, device="cpu")["perplexity"]
    dense_curve = evaluate_model(loading.SMOLLM2_ALIAS, source="austen", seqlen=512, max_windows=scoring.windows, device="cpu")["perplexity"]
    print(f"dense {dense:.3f} (on recover's {scoring.windows} evaluation windows {dense_curve:.3f})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="recovery-"))
    rows, curves = [], {}
    try:
        for name in args.only or RUNS:
            pattern, method, options = RUNS[name]
            t0 = time.perf_counter()
            pruned = oneshot(prepare(loading.SMOLLM2_ALIAS, out=work / name, method=method, pattern=pattern, **options, **calibration, storage="auto",
                                     device="cpu"))
            prune_seconds = time.perf_counter() - t0
            before = evaluate_model(str(work / name), **evaluation, device="cpu")["perplexity"]
            result = recover(RecoverRequest(str(work / name), Output(work / f"{name}-recovered"), training=training, evaluation=scoring, device="cpu"),
                             Progress(name))
            after = evaluate_model(str(work / f"{name}-recovered"), **evaluation, device="cpu")["perplexity"]
            row = {"run": name, "pattern": pattern, "method": method, "storage": pruned.manifest.storage, "pruned": before, "recovered": after,
                   "gap_closed": (before - after) / (before - dense), "tokens": result["tokens"], "steps": result["steps"],
                   "recover_seconds": result["seconds"], "prune_seconds": round(prune_seconds, 1), "tokens_per_s": result["tokens_per_s"],
                   "matmul_fraction": result["matmul_fraction"], "log": result["log"]}
            rows.append(row)
            curves[name] = result["log"]
            print(f"{name}: {before:.3f} -> {after:.3f} (dense {dense:.3f}): gap closed {row['gap_closed']:.1%} in {result['seconds']:.0f} s", flush=True)
            report = write(args, rows, curves, dense, dense_curve, rate)  # after every run: a long study keeps what it has
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(report)


def write(args, rows: list[dict], curves: dict, dense: float, dense_curve: float, rate: float) -> str:
    header = ["run", "storage", "pruned", "recovered", "gap closed", "tokens", "recover wall-clock", "tokens/s (overall)", "× matmul rate"]
    cells = [[r["run"], r["storage"], f"{r['pruned']:.2f}", f"{r['recovered']:.2f}", f"{r['gap_closed']:.0%}", f"{r['tokens']:,}",
              f"{r['recover_seconds'] / 60:.1f} min", f"{r['tokens_per_s']:.0f}", f"{r['matmul_fraction']:.0%}"] for r in rows]
    windows, calibration = (4, "4×128") if args.check else (64, "64×512")
    intro = (f"SmolLM2-135M, dense perplexity {dense:.2f} on {windows}×512 windows of Emma + Persuasion; calibration {calibration} Austen (seed 0); "
             f"`recover` defaults ({rows[0]['tokens'] if rows else args.tokens:,} tokens); CPU, {torch.get_num_threads()} threads, float32 matmul {rate / 1e9:.0f} GFLOP/s; "
             f"`python bench/studies/recovery.py{' --check' if args.check else ''}`")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "recovery-check" if args.check else "recovery"
    (args.out / f"{stem}.json").write_text(json.dumps({"dense": dense, "dense_on_curve_windows": dense_curve, "matmul_rate": rate, "rows": rows}, indent=2) + "\n")
    report = "\n".join([intro, "", *markdown_table(header, cells)]) + "\n"
    (args.out / f"{stem}.md").write_text(report)
    recovery_curves(curves, args.out / f"{stem}.png", title="recover: evaluation perplexity (8×512 windows) during distillation, SmolLM2-135M",
                    dense=dense_curve)
    return report


if __name__ == "__main__":
    main()
