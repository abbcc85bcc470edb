"""MLP-only structured (a plain Hugging Face checkpoint) vs structured:0.3 on every linear, SmolLM2.

    python bench/studies/plain_shrink.py [--nsamples 64 --eval-windows 64 --reps 5]

bench/studies/quality.py's protocol (64 × 512 Austen calibration tokens, seed 0; perplexity on 64 × 512
tokens of Emma + Persuasion), Thanos α = 0 for both:
- `structured:0.3` on all decoder linears, shrunk (narrowed MLPs plus gathers elsewhere);
- `--targets down_proj` at the fraction P that removes the same number of decoder parameters
  as that shrunk model (each dropped MLP channel removes a row of gate and up and a column of
  down), shrunk: every layer keeps the same width, so it is saved as a plain checkpoint.
Then prefill (1 × 512) and decode (64-token prompt, 64 greedy tokens) on this CPU, interleaved
repetitions, medians with min–max, as ratios to dense from the same run.
Writes bench/results/plain_shrink.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from thanos_deploy import compress_model, data, loading, models
from thanos_deploy.compact.plain import plain_config
from thanos_deploy.compact.shrink import shrink_model
from thanos_deploy.evaluate import perplexity
from thanos_deploy.request import Pruning


def decoder_params(model) -> int:
    return sum(p.numel() for layer in models.decoder_layers(model) for n, p in layer.named_parameters() if p.ndim == 2)


def mlp_fraction(dense, removed: int) -> float:
    """The fraction of MLP channels whose removal drops `removed` decoder parameters."""
    subs = models.linears(models.decoder_layers(dense)[0])
    producers, consumer = models.mlp(subs)
    per_channel = sum(subs[p].in_features for p in producers) + subs[consumer].out_features
    return removed / (per_channel * len(models.decoder_layers(dense))) / subs[consumer].in_features


def timings(nets: dict, prompt: torch.Tensor, reps: int, eos: int) -> dict:
    times = {label: {"prefill": [], "decode": []} for label in nets}
    short = prompt[:, :64]
    with torch.no_grad():
        for net in nets.values():
            net(prompt, use_cache=False)  # warm-up
        for _ in range(reps):
            for label, net in nets.items():
                t = time.perf_counter()
                net(prompt, use_cache=False)
                times[label]["prefill"].append(time.perf_counter() - t)
                t = time.perf_counter()
                out = net.generate(short, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=eos)
                times[label]["decode"].append((out.shape[1] - short.shape[1]) / (time.perf_counter() - t))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()

    dense, tokenizer = loading.load(loading.SMOLLM2_ALIAS)
    calib = data.calibration_tokens("austen", tokenizer, nsamples=args.nsamples, seqlen=512, seed=0)
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), 512, args.eval_windows)
    nets, rows = {"dense": dense}, []

    allnet = copy.deepcopy(dense)
    compress_model(allnet, calib, Pruning("thanos", "structured:0.3", {"alpha": 0.0}))
    all_ppl = perplexity(allnet, windows)["perplexity"]
    shrink_model(allnet, alpha=0.0)
    removed = decoder_params(dense) - decoder_params(allnet)
    fraction = mlp_fraction(dense, removed)

    mlpnet = copy.deepcopy(dense)
    compress_model(mlpnet, calib, Pruning("thanos", f"structured:{fraction:.4f}", {"alpha": 0.0}, targets=["down_proj"]))
    mlp_ppl = perplexity(mlpnet, windows)["perplexity"]
    plain = plain_config(mlpnet, shrink_model(mlpnet, alpha=0.0))

    dense_ppl = perplexity(dense, windows)["perplexity"]
    nets["structured:0.3, all linears (shrunk)"] = allnet
    nets[f"structured:{fraction:.3f}, down_proj only (plain: {plain})"] = mlpnet
    times = timings(nets, windows[:1], args.reps, tokenizer.eos_token_id)
    base = {k: statistics.median(v) for k, v in times["dense"].items()}
    for (label, net), ppl in zip(nets.items(), (dense_ppl, all_ppl, mlp_ppl)):
        prefill = [t / base["prefill"] for t in times[label]["prefill"]]
        decode = [r / base["decode"] for r in times[label]["decode"]]
        rows.append({"model": label, "perplexity": ppl, "decoder_params": decoder_params(net),
                     "prefill_s": statistics.median(times[label]["prefill"]), "prefill_ratio": statistics.median(prefill),
                     "prefill_ratio_range": [min(prefill), max(prefill)], "decode_tok_s": statistics.median(times[label]["decode"]),
                     "decode_ratio": statistics.median(decode), "decode_ratio_range": [min(decode), max(decode)]})

    header = (f"SmolLM2-135M fp32, Thanos α=0, calibration {args.nsamples}×512 Austen tokens (seed 0), perplexity on "
              f"{args.eval_windows}×512 tokens of Emma + Persuasion; torch {torch.__version__} CPU, {torch.get_num_threads()} threads, "
              f"{args.reps} interleaved repetitions (median, min–max of the ratio to the same run's dense median)")
    lines = [header, "", "| model | perplexity | decoder params | prefill 1×512 vs dense | decode tok/s vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['perplexity']:.3f} | {r['decoder_params'] / 1e6:.2f} M | {r['prefill_ratio']:.2f}× "
            f"({r['prefill_ratio_range'][0]:.2f}–{r['prefill_ratio_range'][1]:.2f}) | {r['decode_ratio']:.2f}× "
            f"({r['decode_ratio_range'][0]:.2f}–{r['decode_ratio_range'][1]:.2f}) |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plain_shrink.json").write_text(json.dumps({"protocol": header, "rows": rows, "times": times}, indent=2) + "\n")
    (args.out / "plain_shrink.md").write_text(table)


if __name__ == "__main__":
    main()
