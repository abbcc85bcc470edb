"""Do fp16 and bf16 models prune like fp32? Masks and perplexity on SmolLM2 (issue 12's numerics).

    python bench/studies/half_precision.py           # Thanos 2:4, 16 x 256 calibration tokens, 16 x 512 evaluation, 4 seeds
    python bench/studies/half_precision.py --method wanda --nsamples 8 --seeds 2

The model is loaded in float32, float16 and bfloat16 and pruned with the same calibration tokens
(statistics are float32 in every case), once per calibration seed: the seeds measure the noise a
user sees anyway (which windows calibrate), and pairing each half-precision run with the float32
run of the same seed separates the dtype's effect from it. Perplexity is always computed in
float32 (the half-precision weights are exactly representable in float32), so only the pruning and
the rounding of the weights differ; the dense model is evaluated the same way in each dtype, to
show how much of a difference the rounding of the dense weights alone makes. Also printed: the
fraction of mask entries equal to the float32 run's of the same seed. Writes
bench/results/half_precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

from thanos_deploy import data, loading, models
from thanos_deploy.evaluate import perplexity
from thanos_deploy.pipeline.sequential import compress_model
from thanos_deploy.request import Pruning

DTYPES = ["float32", "float16", "bfloat16"]


def masks(model) -> list[torch.Tensor]:
    return [linear.weight.detach() == 0 for layer in models.decoder_layers(model) for linear in models.linears(layer).values()]


def agreement(found: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return sum(int((a == b).sum()) for a, b in zip(found, reference)) / sum(m.numel() for m in found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=loading.SMOLLM2_ALIAS)
    ap.add_argument("--method", default="thanos")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=4, help="calibration seeds 0..N-1, each pruned in every dtype")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    transformers.logging.disable_progress_bar()
    _, tokenizer = loading.load(args.model)
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), 512, args.eval_windows)
    print(f"{args.model}, {args.method} {args.pattern}, calibration {args.nsamples} x {args.seqlen} Austen tokens, "
          f"seeds 0..{args.seeds - 1}, evaluation {len(windows)} x 512 (in float32), {torch.get_num_threads()} threads")
    dense, rows = {}, []
    for dtype in DTYPES:
        net, _ = loading.load(args.model, dtype=dtype)
        dense[dtype] = perplexity(net.float(), windows)["perplexity"]
        print(f"{dtype:>9} dense: perplexity {dense[dtype]:.3f}", flush=True)
    for seed in range(args.seeds):
        ids = data.calibration_tokens("austen", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
        reference = None
        for dtype in DTYPES:
            net, _ = loading.load(args.model, dtype=dtype)
            t0 = time.perf_counter()
            report = compress_model(net, ids, Pruning(args.method, args.pattern))
            seconds = time.perf_counter() - t0
            found = masks(net)
            reference = reference or found
            ppl = perplexity(net.float(), windows)["perplexity"]
            rows.append({"dtype": dtype, "calibration_seed": seed, "perplexity": ppl,
                         "masks_equal_to_float32_same_seed": agreement(found, reference),
                         "sparsity": report["sparsity"], "seconds": round(seconds, 1)})
            print(f"{dtype:>9} seed {seed}: perplexity {ppl:.3f}, mask entries equal to float32: {rows[-1]['masks_equal_to_float32_same_seed']:.4f}, "
                  f"sparsity {report['sparsity']:.4f}, {seconds:.0f} s", flush=True)
            del net
    summary = summarize(rows, dense, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "method": args.method, "pattern": args.pattern, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "eval_windows": len(windows), "seeds": args.seeds, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "dense": dense, "rows": rows, "summary": summary}
    (args.out / "half_precision.json").write_text(json.dumps(result, indent=2) + "\n")


def summarize(rows: list[dict], dense: dict, seeds: int) -> dict:
    """Per half dtype: the mean change of perplexity from float32 over paired seeds, against the seeds' spread."""
    ppl = {(r["dtype"], r["calibration_seed"]): r["perplexity"] for r in rows}
    base = [ppl["float32", s] for s in range(seeds)]
    noise = statistics.stdev(base) / statistics.mean(base) if seeds > 1 else float("nan")
    print(f"float32 over {seeds} calibration seeds: perplexity {min(base):.3f}-{max(base):.3f}, "
          f"standard deviation {noise:.2%} of the mean (the noise)")
    summary = {"float32_seed_std_relative": noise}
    for dtype in DTYPES[1:]:
        changes = [ppl[dtype, s] / ppl["float32", s] - 1 for s in range(seeds)]
        mean = statistics.mean(changes)
        dense_change = dense[dtype] / dense["float32"] - 1
        verdict = "within" if abs(mean) <= noise else "OUTSIDE"
        print(f"{dtype}: pruned perplexity {mean:+.2%} from float32 on average (per seed {', '.join(f'{c:+.2%}' for c in changes)}); "
              f"dense {dense_change:+.2%}; {verdict} the seed noise ({noise:.2%})")
        summary[dtype] = {"mean_change": mean, "changes": changes, "dense_change": dense_change, "within_noise": verdict == "within"}
    return summary


if __name__ == "__main__":
    main()
