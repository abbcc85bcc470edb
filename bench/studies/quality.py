"""Perplexity of every method and pattern on SmolLM2 with Austen calibration: one table.

    python bench/studies/quality.py            # 64 calibration windows x 512 tokens, 64 evaluation windows x 512, seed 0
    python bench/studies/quality.py --quick    # 16 x 256 calibration, 16 x 512 evaluation

Methods: dense, magnitude, Wanda, SparseGPT, Thanos α=0 and α=0.1 (N:M and structured only: α
must be 0 for unstructured). Patterns: unstructured:0.5, 2:4, structured:0.3. Perplexity on the
Emma + Persuasion split. Writes bench/results/quality[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from thanos_deploy import loading
from thanos_deploy.compare import Run, compare
from thanos_deploy.compare import table as compare_table
from thanos_deploy.console import console, table
from thanos_deploy.request import Calibration, Evaluation, Execution

PATTERNS = ("unstructured:0.5", "2:4", "structured:0.3")


def runs_for(pattern: str) -> list[Run]:
    runs = [Run("magnitude"), Run("wanda"), Run("sparsegpt"), Run("thanos", {"alpha": 0.0})]
    if not pattern.startswith("unstructured"):
        runs.append(Run("thanos", {"alpha": 0.1}))
    return runs


def markdown(rows: list[dict], dense: float, header: str) -> str:
    lines = [header, "", "| pattern | method | perplexity | × dense | sparsity | pruning math s | total s |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| — | dense | {dense:.3f} | 1.00 | 0.000 | | |")
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['label']} | {r['perplexity']:.3f} | {r['perplexity'] / dense:.2f} | {r['sparsity']:.3f} "
            f"| {r['prune_seconds']:.1f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=loading.SMOLLM2_ALIAS)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    transformers.logging.disable_progress_bar()
    protocol = dict(nsamples=16, seqlen=256, eval_windows=16) if args.quick else dict(nsamples=64, seqlen=512, eval_windows=64)
    common = dict(calibration=Calibration(nsamples=protocol["nsamples"], seqlen=protocol["seqlen"]),
                  evaluation=Evaluation(windows=protocol["eval_windows"], seqlen=512), execution=Execution(device=args.device))

    dense = compare(args.model, [Run("dense")], "2:4", **common)[0]
    rows = []
    for pattern in args.patterns.split(","):
        for r in compare(args.model, runs_for(pattern), pattern, **common):
            rows.append({"pattern": pattern, **r})
            console.print(f"{pattern:>17}  {r['label']:<18} ppl {r['perplexity']:.3f}  sparsity {r['sparsity']:.3f}  {r['seconds']:.0f} s")

    header = (
        f"{args.model}, calibration {protocol['nsamples']}×{protocol['seqlen']} tokens (Sense and Sensibility + Pride and Prejudice, seed 0), "
        f"evaluation {protocol['eval_windows']}×512 tokens (Emma + Persuasion), device {args.device}, {torch.get_num_threads()} threads"
    )
    table_rows = [{**r, "label": f"{r['pattern']} · {r['label']}"} for r in rows]
    console.print(table(header, *compare_table([dense, *table_rows])))
    for pattern in args.patterns.split(","):
        mine = {r["label"]: r["perplexity"] for r in rows if r["pattern"] == pattern}
        best = min(mine, key=mine.get)
        console.print(f"{pattern}: best {best} ({mine[best]:.3f})")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quality-quick" if args.quick else "quality"
    (args.out / f"{stem}.json").write_text(json.dumps({"protocol": header, "dense": dense, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(rows, dense["perplexity"], header))
    console.print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
