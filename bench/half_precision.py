"""Do fp16 and bf16 models prune like fp32? Masks and perplexity on SmolLM2 (issue 12's numerics).

    python bench/half_precision.py           # Thanos 2:4, 16 x 256 calibration tokens, 16 x 512 evaluation
    python bench/half_precision.py --method wanda --nsamples 8

The model is loaded in float32, float16 and bfloat16 and pruned with the same calibration tokens
(statistics are float32 in every case); a fourth float32 run calibrates on other windows (seed 1)
and measures the noise a user sees anyway. For each run: the fraction of mask entries equal to the
float32 run's, and perplexity on the evaluation split, computed in float32 so that only the pruning
differs (the half-precision weights are exactly representable in float32). Writes
bench/results/half_precision.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from thanos_deploy import data, models
from thanos_deploy.driver import compress_model
from thanos_deploy.evaluate import perplexity

RUNS = [("float32", 0), ("float16", 0), ("bfloat16", 0), ("float32", 1)]


def masks(model) -> list[torch.Tensor]:
    return [linear.weight.detach() == 0 for layer in models.decoder_layers(model) for linear in models.linears(layer).values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=models.SMOLLM2_ALIAS)
    ap.add_argument("--method", default="thanos")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    transformers.logging.disable_progress_bar()
    _, tokenizer = models.load(args.model)
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), 512, args.eval_windows)
    reference, rows = None, []
    print(f"{args.model}, {args.method} {args.pattern}, calibration {args.nsamples} x {args.seqlen} Austen tokens, "
          f"evaluation {len(windows)} x 512 (in float32), {torch.get_num_threads()} threads")
    for dtype, seed in RUNS:
        net, _ = models.load(args.model, dtype=dtype)
        ids = data.calibration_tokens("austen", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
        t0 = time.perf_counter()
        report = compress_model(net, ids, method=args.method, pattern=args.pattern)
        seconds = time.perf_counter() - t0
        found = masks(net)
        reference = reference or found
        agree = sum(int((a == b).sum()) for a, b in zip(found, reference)) / sum(m.numel() for m in found)
        ppl = perplexity(net.float(), windows)["perplexity"]
        rows.append({"dtype": dtype, "calibration_seed": seed, "perplexity": ppl, "masks_equal_to_float32_seed0": agree,
                     "sparsity": report["sparsity"], "seconds": round(seconds, 1)})
        print(f"{dtype:>9} seed {seed}: perplexity {ppl:.3f}, mask entries equal to float32 seed 0: {agree:.4f}, "
              f"sparsity {report['sparsity']:.3f}, {seconds:.0f} s", flush=True)
        del net
    base, noise = rows[0]["perplexity"], abs(rows[3]["perplexity"] / rows[0]["perplexity"] - 1)
    for r in rows[1:3]:
        change = abs(r["perplexity"] / base - 1)
        print(f"{r['dtype']}: perplexity {change:.2%} from float32; calibration-seed noise {noise:.2%}: "
              f"{'within' if change <= noise else 'OUTSIDE'} noise")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "method": args.method, "pattern": args.pattern, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "eval_windows": len(windows), "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    (args.out / "half_precision.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
