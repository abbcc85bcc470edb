"""Dense vs structured-shrunk SmolLM2 in PyTorch on CPU: does removing columns really pay?

    python bench/compact_speed.py [--reps 5]

Prunes SmolLM2 with Thanos structured:0.3 (α = 0 and α = 0.1) on a small Austen calibration set,
shrinks both, saves all three models, then measures in one process with interleaved repetitions
(dense, α=0, α=0.1, dense, ...): prefill latency at 1×512 and 4×512 tokens, decode tokens/s with
a KV cache (64-token prompt, 64 greedy tokens), and, in one fresh process per model, peak memory
while loading and running 4×512. Every figure is a median and a ratio to dense from the same run,
next to the FLOP ratio the shapes predict. Also checks that the shrunk logits match the masked
ones. Writes bench/results/compact_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from thanos_deploy import checkpoint, compress_model, data, load, models
from thanos_deploy.compact import shrink_model
from thanos_deploy.inspect import inspect_model


def peak_memory_child(folder: str) -> None:
    """Run in a fresh process: load, one 4x512 prefill, print peak RSS in MiB.

    VmHWM, not ru_maxrss: on Linux a child keeps its parent's ru_maxrss across fork and exec.
    """
    model, _ = load(folder)
    with torch.no_grad():
        model(torch.randint(0, 1000, (4, 512)), use_cache=False)
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


def model_flops(model) -> float:
    """Multiply-adds per token of all linears, LM head included (attention scores excluded)."""
    result = inspect_model(model, None)
    decoder = sum(r["flops_vs_dense"] * r["shape"][0] * r["shape"][1] for r in result["rows"])
    head = model.get_output_embeddings()
    return decoder + head.in_features * head.out_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peak-memory", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.peak_memory:
        return peak_memory_child(args.peak_memory)

    dense, tokenizer = models.load(models.SMOLLM2_ALIAS)
    calib = data.calibration_tokens("austen", tokenizer, nsamples=16, seqlen=256)
    work = Path(tempfile.mkdtemp(prefix="compact-speed-"))
    folders = {"dense": work / "dense"}
    checkpoint.save(dense, tokenizer, folders["dense"], {"storage": "masked"})
    prompt = data.windows(data.evaluation_tokens("austen", tokenizer), 512, 4)
    check = {}
    for alpha in (0.0, 0.1):
        label = f"structured:0.3 α={alpha:g}"
        net = copy.deepcopy(dense)
        compress_model(net, calib, method="thanos", pattern="structured:0.3", alpha=alpha)
        with torch.no_grad():
            masked = net(prompt[:2]).logits
            masked64 = copy.deepcopy(net).double()(prompt[:2]).logits
        specs = shrink_model(net, alpha=alpha)
        with torch.no_grad():
            shrunk = net(prompt[:2]).logits
            shrunk64 = copy.deepcopy(net).double()(prompt[:2]).logits
        check[label] = {
            "max_abs_logit_diff_fp32": float((shrunk - masked).abs().max()),
            "max_abs_logit_diff_fp64": float((shrunk64 - masked64).abs().max()),
            "fp32_vs_fp64_masked": float((masked.double() - masked64).abs().max()),
        }
        folders[label] = work / f"alpha{alpha:g}"
        checkpoint.save(net, tokenizer, folders[label], {"storage": "shrunk", "modules": specs, "pattern": "structured:0.3"})
        del net

    nets = {label: load(str(folder))[0] for label, folder in folders.items()}
    flops = {label: model_flops(net) for label, net in nets.items()}
    linear_flops = {label: inspect_model(net, checkpoint.read_manifest(folders[label]))["totals"]["flops_vs_dense"] for label, net in nets.items()}
    times = {label: {"prefill 1x512": [], "prefill 4x512": [], "decode": []} for label in nets}
    short = prompt[:1, :64]
    with torch.no_grad():
        for label, net in nets.items():  # warm-up
            net(prompt[:1], use_cache=False)
        for _ in range(args.reps):
            for label, net in nets.items():
                for name, batch in (("prefill 1x512", prompt[:1]), ("prefill 4x512", prompt)):
                    t = time.perf_counter()
                    net(batch, use_cache=False)
                    times[label][name].append(time.perf_counter() - t)
                t = time.perf_counter()
                out = net.generate(short, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                times[label]["decode"].append((out.shape[1] - short.shape[1]) / (time.perf_counter() - t))
    peak = {}
    for label, folder in folders.items():
        child = subprocess.run([sys.executable, __file__, "--peak-memory", str(folder)], capture_output=True, text=True, check=True)
        peak[label] = float(child.stdout.strip().splitlines()[-1])
    size = {label: (folder / "model.safetensors").stat().st_size for label, folder in folders.items()}

    rows = []
    for label in nets:
        med = {k: statistics.median(v) for k, v in times[label].items()}
        rows.append({"model": label, **{k: round(v, 4) for k, v in med.items()}, "peak_rss_mib": round(peak[label]), "file_mib": round(size[label] / 2**20, 1),
                     "linear_flops_vs_dense": round(linear_flops[label], 3), "model_flops_vs_dense": round(flops[label] / flops["dense"], 3)})
    base = rows[0]
    lines = [
        f"SmolLM2-135M fp32, torch {torch.__version__} CPU, {torch.get_num_threads()} threads, {args.reps} interleaved repetitions (medians); ratios to dense from the same run",
        "",
        "| model | prefill 1×512 | prefill 4×512 | decode tok/s | peak RSS | file | linear FLOPs | model FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = lambda k, inv=False: (base[k] / r[k]) if inv else (r[k] / base[k])  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['prefill 1x512']:.3f} s ({ratio('prefill 1x512'):.2f}×) | {r['prefill 4x512']:.3f} s ({ratio('prefill 4x512'):.2f}×) "
            f"| {r['decode']:.1f} ({ratio('decode'):.2f}×) | {r['peak_rss_mib']} MiB ({ratio('peak_rss_mib'):.2f}×) "
            f"| {r['file_mib']} MiB ({ratio('file_mib'):.2f}×) | {r['linear_flops_vs_dense']:.2f}× | {r['model_flops_vs_dense']:.2f}× |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    for label, c in check.items():
        print(f"{label}: shrunk vs masked logits, max abs diff {c['max_abs_logit_diff_fp32']:.2e} in fp32 "
              f"({c['max_abs_logit_diff_fp64']:.1e} in fp64; fp32 vs fp64 of the masked model itself: {c['fp32_vs_fp64_masked']:.2e})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compact_speed.json").write_text(json.dumps({"rows": rows, "times": times, "logit_check": check}, indent=2) + "\n")
    (args.out / "compact_speed.md").write_text(table)


if __name__ == "__main__":
    main()
