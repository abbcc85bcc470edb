"""Seconds per stage of whole compression runs, methods side by side (issue 10's end-to-end target).

    python bench/studies/compress_time.py                                        # Wanda 2:4 on SmolLM2, 64 x 512
    python bench/studies/compress_time.py --methods "thanos:block_size=32,sparsegpt" --repeats 3

Each run is a full `compress_model` on a fresh copy of the model in this process, with the same
calibration tokens; with several runs and --repeats N they are interleaved (A B A B ...) so the
machine's drift hits all alike. Prints, per run, the seconds of each stage (statistics = dense
forward with the hooks, prune = the method's math, forward = the pruned layer's outputs) summed over
the layers, the total wall time, and the median of the repeats; with two or more methods, the total
of each relative to the last one listed (medians, and the range over the repeats paired in order).
Writes bench/results/compress_time-<pattern>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from thanos_deploy import compress_model, data, loading, models, UserError
from thanos_deploy.compare import parse_methods


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=loading.SMOLLM2_ALIAS)
    ap.add_argument("--methods", default="wanda", help="comma-separated method specs, as compare's --methods")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    try:
        runs = [run for run in parse_methods(args.methods) if run.method != "dense"]
    except UserError as e:
        raise SystemExit(f"error: {e}") from None

    base, tokenizer = loading.load(args.model)
    ids = data.calibration_tokens("austen", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    loaded = rss_mb()
    print(f"{args.model} {args.pattern}, calibration {args.nsamples}x{args.seqlen} austen, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeat(s) interleaved")
    print(f"{'run':<34}{'statistics':>11}{'prune':>8}{'forward':>9}{'total':>8}  (seconds, all layers)")
    timings: dict[str, list[dict]] = {run.label: [] for run in runs}
    for repeat in range(args.repeats):
        for run in runs:
            net = copy.deepcopy(base)
            t0 = time.perf_counter()
            report = compress_model(net, ids, method=run.method, pattern=args.pattern, device=args.device, **run.options)
            total = time.perf_counter() - t0
            stages = {k: round(v, 2) for k, v in report["seconds"].items() if k != "total"}
            timings[run.label].append({**stages, "total": round(total, 2)})
            print(f"{run.label:<34}{stages['statistics']:>11.1f}{stages['prune']:>8.1f}{stages['forward']:>9.1f}{total:>8.1f}", flush=True)
            del net

    summary = {label: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for label, ts in timings.items()}
    print("\nmedians")
    for label, s in summary.items():
        print(f"{label:<34}{s['statistics']:>11.1f}{s['prune']:>8.1f}{s['forward']:>9.1f}{s['total']:>8.1f}")
    ratios = {}
    if len(runs) > 1:
        ref = runs[-1].label
        for label in list(timings)[:-1]:
            paired = [a["total"] / b["total"] for a, b in zip(timings[label], timings[ref])]
            ratios[label] = {"median_total_ratio": summary[label]["total"] / summary[ref]["total"], "paired_ratios": paired}
            print(f"total {label} / {ref}: {ratios[label]['median_total_ratio']:.3f} (medians); "
                  f"per repeat {', '.join(f'{r:.3f}' for r in paired)}")
    print(f"peak RSS {rss_mb():.0f} MB (model loaded: {loaded:.0f} MB)")
    result = {
        "model": args.model, "pattern": args.pattern, "calibration": f"{args.nsamples}x{args.seqlen} austen",
        "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
        "layers": len(models.decoder_layers(base)), "timings": timings, "medians": summary, "total_ratios": ratios,
        "peak_rss_mb": round(rss_mb(), 1), "rss_after_loading_mb": round(loaded, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compress_time-{args.pattern.replace(':', 'of')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
