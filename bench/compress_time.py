"""Seconds per decoder layer and peak memory of one compression run (default: Wanda 2:4 on SmolLM2).

    python bench/compress_time.py [--method wanda] [--pattern 2:4] [--nsamples 64] [--seqlen 512]

Prints a table and writes bench/results/compress_time-<method>-<pattern>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from thanos_deploy import compress_model, data, models


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.SMOLLM2_ALIAS)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    model, tokenizer = models.load(args.model)
    ids = data.calibration_tokens("austen", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    before = rss_mb()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = compress_model(model, ids, method=args.method, pattern=args.pattern, device=args.device)
    wall = time.perf_counter() - t0
    layers = report["layers"]
    per_layer = [sum(r["seconds"].values()) for r in layers]
    result = {
        "model": args.model,
        "method": args.method,
        "pattern": args.pattern,
        "calibration": f"{args.nsamples}x{args.seqlen} austen",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "wall_seconds": round(wall, 2),
        "seconds_per_layer": round(sum(per_layer) / len(per_layer), 3),
        "stage_seconds_per_layer": {k: round(v / len(layers), 3) for k, v in report["seconds"].items() if k != "total"},
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_before_compress_mb": round(before, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device.startswith("cuda") else None,
    }
    print(f"{args.method} {args.pattern} on {args.model}, calibration {result['calibration']}, {args.device}, {result['threads']} threads")
    print(f"{'stage':<12}{'s/layer':>10}")
    for k, v in result["stage_seconds_per_layer"].items():
        print(f"{k:<12}{v:>10.3f}")
    print(f"{'total':<12}{result['seconds_per_layer']:>10.3f}   ({len(layers)} layers, {wall:.1f} s wall)")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB (model loaded: {before:.0f} MB)"
          + (f", peak CUDA {result['peak_cuda_mb']:.0f} MB" if result["peak_cuda_mb"] else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"compress_time-{args.method}-{args.pattern.replace(':', 'of')}-{args.device.split(':')[0]}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
