"""Width pruning against structured:0.3 at equal decoder parameters (≈ 0.7× dense), on SmolLM2.

    python bench/studies/width_quality.py            # the quality protocol: 64 × 512 calibration, 64 × 512 evaluation
    python bench/studies/width_quality.py --quick    # 16 × 256 calibration, 16 × 512 evaluation: a check

Rows: Thanos structured:0.3 α = 0 (input columns of every linear), Thanos width MLP-only, and width
MLP + heads with Thanos, SparseGPT (left-to-right update), Wanda and magnitude (no update). The
widths are chosen so every variant keeps the same decoder parameters as structured:0.3 (printed).
Writes bench/results/width-quality[-quick].json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from thanos_deploy import loading
from thanos_deploy.bench.report import markdown_table
from thanos_deploy.compare import Run, compare
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.width import plan

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads in 3 KV groups of head_dim 64. structured:0.3
# keeps 0.7 of every linear's inputs; these widths keep the same decoder parameters (to 0.1 %).
VARIANTS = [
    ("structured:0.3", "thanos:alpha=0"),
    ("width:intermediate_size=922", "thanos"),
    ("width:intermediate_size=1050,num_attention_heads=6", "thanos"),
    ("width:intermediate_size=1050,num_attention_heads=6", "sparsegpt"),
    ("width:intermediate_size=1050,num_attention_heads=6", "wanda"),
    ("width:intermediate_size=1050,num_attention_heads=6", "magnitude"),
]


def decoder_parameters(config, pattern: str) -> float:
    """Decoder-linear parameters kept, as a fraction of dense."""
    (mlp, heads, kv), d = (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads), config.hidden_size // config.num_attention_heads
    h = config.hidden_size
    dense = h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * mlp
    p = parse_pattern(pattern)
    if pattern.startswith("structured:"):
        return 1 - p.sparsity
    w = plan(p, config)
    new_mlp, new_heads, new_kv = w.new
    return (h * (new_heads * d + 2 * new_kv * d) + new_heads * d * h + 3 * h * new_mlp) / dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 × 256 calibration, 16 × 512 evaluation")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    protocol = dict(nsamples=16, seqlen=256, eval_windows=16) if args.quick else dict(nsamples=64, seqlen=512, eval_windows=64)
    started = time.perf_counter()
    config = loading.load(loading.SMOLLM2_ALIAS)[0].config
    rows, dense = [], None
    for i, (pattern, spec) in enumerate(VARIANTS):
        method, _, options = spec.partition(":")
        runs = ([Run("dense")] if i == 0 else []) + [Run(method, dict(kv.split("=") for kv in options.split(",")) if options else {})]
        runs = [Run(r.method, {k: float(v) for k, v in r.options.items()}) for r in runs]
        for row in compare(loading.SMOLLM2_ALIAS, runs, pattern, calib="austen", seed=0, eval_data="austen", eval_seqlen=512,
                           device="cpu", **protocol):
            if row["method"] == "dense":
                dense = row["perplexity"]
                continue
            row["decoder_parameters"] = decoder_parameters(config, pattern)
            rows.append(row)
            print(f"{pattern:52s} {row['label']:18s} ppl {row['perplexity']:8.3f}  params {row['decoder_parameters']:.3f}  {row['seconds']:.0f} s", flush=True)
    reference = rows[0]["perplexity"]
    header = ["pattern", "method", "decoder params × dense", "perplexity", "× structured:0.3", "pruning s"]
    cells = [[r["pattern"], r["label"], f"{r['decoder_parameters']:.3f}", f"{r['perplexity']:.2f}", f"{r['perplexity'] / reference:.2f}",
              f"{r['seconds']:.0f}"] for r in rows]
    intro = (f"SmolLM2-135M (dense perplexity {dense:.2f}), calibration {protocol['nsamples']}×{protocol['seqlen']} Austen (seed 0), "
             f"evaluation {protocol['eval_windows']}×512 Emma + Persuasion, CPU, {torch.get_num_threads()} threads, "
             f"{time.perf_counter() - started:.0f} s; `python bench/studies/width_quality.py{' --quick' if args.quick else ''}`")
    stem = "width-quality-quick" if args.quick else "width-quality"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"dense": dense, "protocol": protocol, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text("\n".join([intro, "", *markdown_table(header, cells)]) + "\n")
    print()
    print(intro)
    print("\n".join(markdown_table(header, cells)))


if __name__ == "__main__":
    main()
