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
from thanos_deploy.bench.plots import recovery_curves
from thanos_deploy.bench.report import markdown_table
from thanos_deploy.bench.timing import matmul_rate
from thanos_deploy.evaluate import evaluate_model
from thanos_deploy.recover import DEFAULT_TOKENS, Settings, recover

RUNS = {
    "thanos-2:4": ("2:4", "thanos", {"alpha": 0.0}),
    "sparsegpt-2:4": ("2:4", "sparsegpt", {}),
    "thanos-structured:0.3": ("structured:0.3", "thanos", {"alpha": 0.0}),
    "thanos-width": ("width:intermediate_size=1050,num_attention_heads=6", "thanos", {}),
}
EVAL = dict(source="austen", seqlen=512, max_windows=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to do (default: all)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"recovery budget (default {DEFAULT_TOKENS}, recover's default)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    rate = matmul_rate()
    print(f"float32 matmul rate {rate / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads", flush=True)
    dense = evaluate_model(loading.SMOLLM2_ALIAS, **EVAL, device="cpu")["perplexity"]
    dense_curve = evaluate_model(loading.SMOLLM2_ALIAS, source="austen", seqlen=512, max_windows=Settings().eval_windows, device="cpu")["perplexity"]
    print(f"dense {dense:.3f} (on recover's {Settings().eval_windows} evaluation windows {dense_curve:.3f})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="recovery-"))
    rows, curves = [], {}
    try:
        for name in args.only or RUNS:
            pattern, method, options = RUNS[name]
            t0 = time.perf_counter()
            pruned = oneshot(loading.SMOLLM2_ALIAS, work / name, method=method, pattern=pattern, options=options, storage="auto",
                             nsamples=64, seqlen=512, device="cpu")
            prune_seconds = time.perf_counter() - t0
            before = evaluate_model(str(work / name), **EVAL, device="cpu")["perplexity"]
            result = recover(str(work / name), work / f"{name}-recovered", settings=Settings(tokens=args.tokens), device="cpu",
                             on_eval=lambda e, name=name: print(f"  {name}: {e['tokens']:>7} tokens {e['seconds']:7.0f} s  ppl {e['perplexity']:.3f}", flush=True))
            after = evaluate_model(str(work / f"{name}-recovered"), **EVAL, device="cpu")["perplexity"]
            row = {"run": name, "pattern": pattern, "method": method, "storage": pruned.manifest["storage"], "pruned": before, "recovered": after,
                   "gap_closed": (before - after) / (before - dense), "tokens": result["tokens"], "steps": result["steps"],
                   "recover_seconds": result["seconds"], "prune_seconds": round(prune_seconds, 1), "tokens_per_s": result["tokens_per_s"],
                   "matmul_fraction": result["matmul_fraction"], "log": result["log"]}
            rows.append(row)
            curves[name] = result["log"]
            print(f"{name}: {before:.3f} -> {after:.3f} (dense {dense:.3f}): gap closed {row['gap_closed']:.1%} in {result['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ["run", "storage", "pruned", "recovered", "gap closed", "tokens", "recover wall-clock", "tokens/s (overall)", "× matmul rate"]
    cells = [[r["run"], r["storage"], f"{r['pruned']:.2f}", f"{r['recovered']:.2f}", f"{r['gap_closed']:.0%}", f"{r['tokens']:,}",
              f"{r['recover_seconds'] / 60:.1f} min", f"{r['tokens_per_s']:.0f}", f"{r['matmul_fraction']:.0%}"] for r in rows]
    intro = (f"SmolLM2-135M, dense perplexity {dense:.2f} on 64×512 windows of Emma + Persuasion; calibration 64×512 Austen (seed 0); "
             f"`recover` defaults ({args.tokens:,} tokens); CPU, {torch.get_num_threads()} threads, float32 matmul {rate / 1e9:.0f} GFLOP/s; "
             f"`python bench/studies/recovery.py`")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps({"dense": dense, "dense_on_curve_windows": dense_curve, "matmul_rate": rate, "rows": rows}, indent=2) + "\n")
    (args.out / "recovery.md").write_text("\n".join([intro, "", *markdown_table(header, cells)]) + "\n")
    recovery_curves(curves, args.out / "recovery.png", title="recover: evaluation perplexity (8×512 windows) during distillation, SmolLM2-135M",
                    dense=dense_curve)
    print()
    print(intro)
    print("\n".join(markdown_table(header, cells)))


if __name__ == "__main__":
    main()
