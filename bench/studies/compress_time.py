"""Seconds per stage of whole compression runs, side by side, against the machine's matmul rate.

    python bench/studies/compress_time.py                                               # Wanda 2:4 on SmolLM2, 64 x 512
    python bench/studies/compress_time.py --methods "thanos:block_size=32,sparsegpt" --repeats 3
    python bench/studies/compress_time.py --methods thanos:block_size=32 --against baf85af --repeats 3
    python bench/studies/compress_time.py --methods thanos:block_size=32 --layouts 1x2,2x1 --repeats 5

Every run is a full `compress_model` in fresh processes, on the same calibration tokens, the runs
interleaved (A B A B ...) so the machine's drift hits all alike:
- `--against REV` also runs the code of git revision REV (exported with `git archive`), for the
  "N x today's code" comparison on one machine;
- `--layouts PxT,...` runs each method as P processes of T threads (P > 1: torchrun, gloo), e.g.
  1x2 against 2x1 on a 2-core machine.
Prints, per run, the seconds of each stage summed over the layers (statistics = dense forward with
the hooks, prune = the method's math, forward = the pruned layer's outputs, communication = waiting
for and exchanging statistics and weights between processes), the total and the perplexity of the
result (`--eval-windows`, 0 to skip); then the medians, the ratio of every run to the last listed
(medians, and per repeat), and for this checkout's single-process runs each pass's rate: the FLOPs
it performs (`pass_flops`) over its seconds, as a fraction of the float32 matmul
rate measured in the same run (bench/timing.py, before and after the runs).
Writes bench/results/compress_time-<pattern>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("statistics", "prune", "forward", "communication")


@dataclass(frozen=True)
class Run:
    label: str
    spec: str  # a compare-style method spec
    code: str  # "HEAD" (this checkout) or a git revision
    processes: int = 1
    threads: int = 0  # 0: torch's default
    batch_tokens: int = 8192


def export_revision(rev: str, into: Path) -> Path:
    """The tree of `rev`, importable as it was installed: bench/, runtime/ and exporters/ linked
    into thanos_deploy/ (they install there)."""
    tree = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tree)) as tar:
        tar.extractall(into, filter="data")
    for name in ("bench", "runtime", "exporters"):
        if (into / name).is_dir() and not (into / "thanos_deploy" / name).exists():
            (into / "thanos_deploy" / name).symlink_to(into / name)
    return into


def command(run: Run, args, result: Path) -> list[str]:
    worker = [str(Path(__file__).resolve()), "--worker", run.spec, "--result", str(result), "--model", args.model, "--pattern", args.pattern,
              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device, "--eval-windows", str(args.eval_windows),
              "--batch-tokens", str(run.batch_tokens)]
    if run.processes == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(run.processes), *worker]


def launch(run: Run, args, sources: dict[str, Path], masks: Path) -> dict:
    """One run in fresh processes; its figures, and its masks (weight == 0 of every decoder linear) in `masks`."""
    env = dict(os.environ, **({"PYTHONPATH": str(sources[run.code])} if run.code != "HEAD" else {}))
    if run.threads:
        env["OMP_NUM_THREADS"] = str(run.threads)
    result = masks.with_suffix(".json")
    done = subprocess.run(command(run, args, result), env=env, capture_output=True, text=True)
    if done.returncode != 0 or not result.is_file():
        raise SystemExit(f"error: run {run.label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def agreement(a: Path, b: Path) -> tuple[float, list[float]]:
    """The fraction of decoder-linear weights whose pruned/kept state is the same in two runs, in
    all and per decoder layer."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    layers: dict[int, list[int]] = {}
    for k in x:
        same = layers.setdefault(int(k.split(".")[0]), [0, 0])
        same[0] += int((x[k] == y[k]).sum())
        same[1] += x[k].numel()
    return sum(v[0] for v in layers.values()) / sum(v[1] for v in layers.values()), [v[0] / v[1] for _, v in sorted(layers.items())]


def worker(args) -> None:
    """One run in this process (or in each of torchrun's); rank 0 writes the figures to --result."""
    from thanos_deploy import compress_model, data, loading, models
    from thanos_deploy.compare import parse_methods
    from thanos_deploy.evaluate import evaluate

    try:
        from thanos_deploy.pipeline import distributed
        world = distributed.start(args.device)
    except ImportError:  # code from before distributed runs
        world = None
    try:
        from thanos_deploy.request import Execution, Pruning
    except ImportError:  # code from before the request objects: loose options
        Execution = Pruning = None
    (run,) = [r for r in parse_methods(args.worker) if r.method != "dense"]
    model, tokenizer = loading.load(args.model)
    ids = data.calibration_tokens("austen", tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    kwargs = {"world": world} if world is not None and world.size > 1 else {}
    t0 = time.perf_counter()
    if Pruning is not None:
        report = compress_model(model, ids, Pruning(run.method, args.pattern, run.options), Execution(device=args.device, batch_tokens=int(args.batch_tokens)),
                                **kwargs)
    else:
        report = compress_model(model, ids, method=run.method, pattern=args.pattern, device=args.device, batch_tokens=int(args.batch_tokens),
                                **run.options, **kwargs)
    total = time.perf_counter() - t0
    if world is not None and world.rank != 0:
        return distributed.finish(world)
    figures = {k: report["seconds"].get(k, 0.0) for k in STAGES}
    figures["total"] = round(total, 2)
    figures["threads"] = torch.get_num_threads()
    if args.eval_windows:
        figures["perplexity"] = evaluate(model, tokenizer, "austen", 512, args.eval_windows, args.device)["perplexity"]
    figures["groups"] = report["layers"][0]["groups"]
    from safetensors.torch import save_file

    layers = models.decoder_layers(model)
    save_file({f"{i}.{name}": (linear.weight == 0).to(torch.uint8) for i, layer in enumerate(layers)
               for name, linear in models.linears(layer).items()}, args.result.with_suffix(".safetensors"))
    args.result.write_text(json.dumps(figures))
    if world is not None:
        distributed.finish(world)


def pass_flops(model_name: str, groups: list[list[str]], nsamples: int, seqlen: int) -> dict[str, float]:
    """FLOPs each pass of this checkout's code performs, summed over the layers (all alike):
    forward = every linear and causal attention (QKᵀ and AV over (seqlen+1)/2 positions on
    average); statistics = the same up to the last linear's input (the pass stops there) plus the
    Gram product XᵀX per group of linears sharing an input."""
    from thanos_deploy import loading, models
    from thanos_deploy.measure import attention_macs_per_position

    model, _ = loading.load(model_name)
    layers = models.decoder_layers(model)
    linears = models.linears(layers[0])
    tokens = nsamples * seqlen
    attention = attention_macs_per_position(model.config) / len(layers) * (seqlen + 1) / 2
    every = sum(m.in_features * m.out_features for m in linears.values())
    last = linears[groups[-1][-1]]
    gram = sum(linears[group[0]].in_features ** 2 for group in groups)
    forward = 2 * tokens * len(layers) * (every + attention)
    stats = 2 * tokens * len(layers) * (every - last.in_features * last.out_features + attention + gram)
    return {"statistics": stats, "forward": forward}


def parse_layouts(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --layouts takes PROCESSESxTHREADS items, e.g. 1x2,2x1, not '{text}'") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="wanda", help="comma-separated method specs, as compare's --methods")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--against", default=None, help="also run the code of this git revision, side by side")
    ap.add_argument("--layouts", default="1x0", help="PROCESSESxTHREADS runs of every method (0 threads: torch's default)")
    ap.add_argument("--batch-tokens", default="8192", help="comma-separated: runs of every method with each (8192: compress's default)")
    ap.add_argument("--eval-windows", type=int, default=32, help="perplexity of each result on this many Emma/Persuasion windows (0: skip)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT))
    from thanos_deploy import UserError
    from thanos_deploy.compare import parse_methods
    from thanos_deploy.measure import machine, matmul_rate

    try:
        specs = [r for r in parse_methods(args.methods) if r.method != "dense"]
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    spec_text = lambda r: ":".join([r.method, *(f"{k}={v}" for k, v in r.options.items())])  # noqa: E731
    runs = []
    for batch_tokens in (int(v) for v in args.batch_tokens.split(",")):
        for processes, threads in parse_layouts(args.layouts):
            layout = ("" if (processes, threads) == (1, 0) else f" {processes}x{threads}") + ("" if batch_tokens == 8192 else f" batch {batch_tokens}")
            runs += [Run(f"{r.label}{layout}", spec_text(r), "HEAD", processes, threads, batch_tokens) for r in specs]
    if args.against:
        runs = [Run(f"{r.label} @{args.against}", r.spec, args.against, r.processes, r.threads, r.batch_tokens) for r in runs] + runs

    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        if args.against:
            sources[args.against] = export_revision(args.against, Path(tmp) / "rev")
        rates = [matmul_rate(args.device)]
        print(f"{args.model} {args.pattern}, calibration {args.nsamples}x{args.seqlen} austen, {args.device}, "
              f"float32 matmul {rates[0] / 1e9:.0f} GFLOP/s, {args.repeats} repeat(s) interleaved")
        print(f"{'run':<40}{'statistics':>11}{'prune':>8}{'forward':>9}{'comm.':>7}{'total':>8}{'ppl':>8}  (seconds, all layers)")
        timings: dict[str, list[dict]] = {run.label: [] for run in runs}
        for repeat in range(args.repeats):
            for i, run in enumerate(runs):
                f = launch(run, args, sources, Path(tmp) / f"masks-{i}-{repeat}.safetensors")
                timings[run.label].append(f)
                print(f"{run.label:<40}{f['statistics']:>11.1f}{f['prune']:>8.1f}{f['forward']:>9.1f}{f['communication']:>7.1f}{f['total']:>8.1f}"
                      f"{f.get('perplexity', float('nan')):>8.2f}", flush=True)
        rates.append(matmul_rate(args.device))
        masks = {run.label: agreement(Path(tmp) / f"masks-{i}-0.safetensors", Path(tmp) / "masks-0-0.safetensors") for i, run in enumerate(runs)}
        repeatable = {run.label: all(agreement(Path(tmp) / f"masks-{i}-{r}.safetensors", Path(tmp) / f"masks-{i}-0.safetensors")[0] == 1.0
                                     for r in range(args.repeats)) for i, run in enumerate(runs)}

    rate = statistics.median(rates)
    keys = (*STAGES, "total", "perplexity") if args.eval_windows else (*STAGES, "total")
    medians = {label: {k: statistics.median(t[k] for t in ts) for k in keys} for label, ts in timings.items()}
    print(f"\nmedians (float32 matmul {rates[0] / 1e9:.0f} GFLOP/s before the runs, {rates[1] / 1e9:.0f} after)")
    for label, m in medians.items():
        print(f"{label:<40}{m['statistics']:>11.1f}{m['prune']:>8.1f}{m['forward']:>9.1f}{m['communication']:>7.1f}{m['total']:>8.1f}"
              f"{m.get('perplexity', float('nan')):>8.2f}")
    print(f"masks against {runs[0].label}'s" + (f" (every run gave the same masks on every repeat: {all(repeatable.values())})" if args.repeats > 1 else "")
          + ", in all and by layer (first, fifth, last):")
    for label, (whole, layers) in masks.items():
        print(f"  {label:<38}{whole:.4f}   " + ", ".join(f"{layers[i]:.4f}" for i in sorted({0, min(4, len(layers) - 1), len(layers) - 1})))
    ratios = {}
    if len(runs) > 1:
        ref = runs[-1].label
        for label in list(timings)[:-1]:
            paired = [a["total"] / b["total"] for a, b in zip(timings[label], timings[ref])]
            ratios[label] = {"median_total_ratio": medians[label]["total"] / medians[ref]["total"], "paired_ratios": paired}
            print(f"total {ref} / {label}: {1 / ratios[label]['median_total_ratio']:.3f} (medians); "
                  f"per repeat {', '.join(f'{1 / r:.3f}' for r in paired)}")
    passes = {}
    for run in runs:
        if run.code != "HEAD" or run.processes != 1:
            continue
        flops = pass_flops(args.model, timings[run.label][0]["groups"], args.nsamples, args.seqlen)
        passes[run.label] = {k: {"tflop": flops[k] / 1e12, "gflop_per_s": flops[k] / medians[run.label][k] / 1e9,
                                 "fraction_of_matmul_rate": flops[k] / medians[run.label][k] / rate} for k in flops}
        print(f"{run.label}: " + "; ".join(f"{k} pass {v['tflop']:.2f} TFLOP at {v['gflop_per_s']:.0f} GFLOP/s = "
                                          f"{v['fraction_of_matmul_rate']:.0%} of the matmul rate" for k, v in passes[run.label].items()))
    result = {
        "model": args.model, "pattern": args.pattern, "calibration": f"{args.nsamples}x{args.seqlen} austen", "device": args.device,
        "repeats": args.repeats, "against": args.against, "matmul_gflop_per_s": [round(r / 1e9, 1) for r in rates],
        "machine": machine(), "timings": timings, "medians": medians, "total_ratios": ratios, "passes": passes,
        "mask_agreement": masks, "same_masks_every_repeat": repeatable,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compress_time-{args.pattern.replace(':', 'of')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
