"""Where a prefill and a decode step spend their time: dense vs structured:0.3 shrunk SmolLM2 on CPU.

    python bench/studies/where_time_goes.py [--prefill 4x512] [--steps 32] [--reps 3]

Builds the three models of bench/studies/compact_speed.py (dense, Thanos structured:0.3 shrunk with α = 0
and 0.1), runs them through the torch runtime that `generate` and `bench` use, and profiles (torch
profiler, CPU) one prefill of `--prefill` (batch x tokens) and `--steps` decode steps after a
64-token prompt, the models interleaved, `--reps` times; every figure is the median over the
repetitions. Each phase's time is split into: the linear products (aten mm / addmm / bmm),
attention (SDPA), the compact layers' gathers and scatters (index_select, index_add_,
scatter_add_), every other aten op (norms, rotary embeddings, activations, KV-cache
concatenations, copies), and what no aten op accounts for (Python and framework code), as
measured under the profiler, which adds some of the last. Then it asks what the products allow:
if every product took exactly its share of dense's products by multiply-adds (decoder linears and
LM head) and the rest took what it took, the speed-up over dense would be the "products-only
bound" printed next to the measured one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from thanos_deploy import data, loading
from thanos_deploy.bench.plan import build, parse_plan
from thanos_deploy.measure import linear_macs
from thanos_deploy.request import Calibration, Execution
from thanos_deploy.runtime import open_backend

GROUPS = {
    "products": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
    "gathers": ("aten::index_select", "aten::index_add_", "aten::scatter_add_"),
}

PROMPT = 64  # decode: prompt tokens before the timed steps, as in compact_speed.py
# the models of compact_speed.py: dense and Thanos structured:0.3 with α = 0 and 0.1, 16×256 Austen calibration tokens, shrunk
PLAN = "structured:0.3 thanos:alpha=0|0.1\n"
PRUNED = "structured:0.3 thanos alpha=0"


def split(run) -> dict[str, float]:
    """Seconds of one call of `run`, by group, from a profile; 'framework' = wall minus aten self time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    out = {name: sum(e.self_cpu_time_total for e in events if e.key in keys) / 1e6 for name, keys in GROUPS.items()}
    out["other ops"] = total - sum(out.values())
    out["framework"] = max(wall - total, 0.0)
    out["wall"] = wall
    return out


def phases(backend, windows: torch.Tensor, steps: int) -> dict[str, dict[str, float]]:
    """Profiled split of a prefill of `windows` and of one decode step (mean over `steps`), each after a warm-up."""
    backend.prefill(windows)
    prefill = split(lambda: backend.prefill(windows))
    logits, state = backend.prefill(windows[:1, :PROMPT])

    def decode_steps():
        nonlocal logits, state
        for _ in range(steps):
            logits, state = backend.decode(logits[:, -1].argmax(-1, keepdim=True), state)

    decode_steps()
    step = {k: v / steps for k, v in split(decode_steps).items()}
    return {"prefill": prefill, "decode step": step}


def batch_by_tokens(text: str) -> tuple[int, int]:
    """'4x512' -> (4, 512); argparse turns the ValueError into one error line."""
    batch, tokens = (int(v) for v in text.split("x"))
    if batch < 1 or tokens < PROMPT:
        raise ValueError(text)
    return batch, tokens


def at_least_one(text: str) -> int:
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=batch_by_tokens, default="4x512", help=f"BATCHxTOKENS of the profiled prefill (TOKENS >= {PROMPT})")
    ap.add_argument("--steps", type=at_least_one, default=32)
    ap.add_argument("--reps", type=at_least_one, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="where-time-goes-") as work:
        folders = build(loading.SMOLLM2_ALIAS, parse_plan(PLAN), Path(work), Calibration(nsamples=16, seqlen=256), Execution(device="cpu"))
        tokenizer = loading.load(loading.SMOLLM2_ALIAS)[1]
        macs = {label: linear_macs(loading.load(str(folder))[0], sparse_kernels=False) for label, folder in folders.items()}
        batch, length = args.prefill
        windows = data.windows(data.evaluation_tokens("austen", tokenizer), length, batch)
        backends = {label: open_backend("torch", str(folder)) for label, folder in folders.items()}
        runs = {label: [] for label in backends}
        for _ in range(args.reps):
            for label, backend in backends.items():
                runs[label].append(phases(backend, windows, args.steps))
    results = {label: {phase: {group: statistics.median(run[phase][group] for run in r) for group in r[0][phase]} for phase in r[0]}
               for label, r in runs.items()}

    print(f"SmolLM2-135M fp32, torch {torch.__version__} CPU, {torch.get_num_threads()} threads, torch runtime; ms under the profiler, "
          f"median of {args.reps} interleaved repetitions (decode: mean step of {args.steps} after a {PROMPT}-token prompt)")
    print()
    cols = ["products", "attention", "gathers", "other ops", "framework", "wall"]
    print("| phase | model | " + " | ".join(cols) + " | speed-up over dense | products-only bound |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    for phase in ("prefill", "decode step"):
        dense = results["dense"][phase]
        for label, by_phase in results.items():
            r = by_phase[phase]
            share = macs[label] / macs["dense"]  # products' multiply-adds relative to dense
            bound = dense["wall"] / (dense["wall"] - dense["products"] + dense["products"] * share)
            print(f"| {phase if phase != 'prefill' else f'prefill {batch}x{length}'} | {label} | " + " | ".join(f"{r[c] * 1e3:.1f}" for c in cols)
                  + f" | {dense['wall'] / r['wall']:.2f}× | {bound:.2f}× |")
    print()
    for phase in ("prefill", "decode step"):
        d = results["dense"][phase]
        rest = d["wall"] - d["products"]
        print(f"{phase}: dense spends {rest * 1e3:.1f} of {d['wall'] * 1e3:.1f} ms outside the linear products "
              f"({rest / d['wall']:.0%}); products ratio α=0 / dense: "
              f"{results[PRUNED][phase]['products'] / d['products']:.2f} "
              f"(multiply-adds {macs[PRUNED] / macs['dense']:.2f})")


if __name__ == "__main__":
    main()
