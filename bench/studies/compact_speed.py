"""Dense vs structured-shrunk SmolLM2 on CPU, in PyTorch and ONNX Runtime: does removing columns pay?

    python bench/studies/compact_speed.py [--reps 5] [--backends torch,ort]

Prunes SmolLM2 with Thanos structured:0.3 (α = 0 and α = 0.1) on a small Austen calibration set,
shrinks both, saves all three models (and exports each to ONNX with KV cache for the ort backend),
then measures in one process with interleaved repetitions (dense, α=0, α=0.1, dense, ..., every
backend in each round): prefill latency at 1×512 and 4×512 tokens and decode tokens/s with the KV
cache (64-token prompt, 64 greedy steps), all through the same runtime backends (`prefill`,
`decode`) that `thanos-deploy generate` uses. Peak memory is measured in one fresh process per
model (torch). Every figure is a median with its min–max over the repetitions, and a ratio to dense
from the same run, next to the FLOP ratios the shapes predict:

- linear FLOPs: multiply-adds of the decoder linears (what pruning removes);
- model FLOPs: every linear (LM head included) plus the attention products QKᵀ and AV at the
  measured shape (prefill: causal, on average (T+1)/2 keys per query; decode: the cached context).
  Norms, rotary embeddings and activations are not counted.

Also checks that the shrunk logits match the masked ones. Writes bench/results/compact_speed.{json,md}.
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

from thanos_deploy import compress_model, data, load, loading
from thanos_deploy.artifact import Manifest, save
from thanos_deploy.compact.shrink import shrink_model
from thanos_deploy.exporters.onnx import export_onnx
from thanos_deploy.inspection import inspect_model
from thanos_deploy.request import Pruning
from thanos_deploy.runtime import open_backend

PROMPT, STEPS = 64, 64  # decode: prompt tokens, then greedy steps with the KV cache


def peak_memory_child(folder: str) -> None:
    """Run in a fresh process: load, one 4x512 prefill, print peak RSS in MiB.

    VmHWM, not ru_maxrss: on Linux a child keeps its parent's ru_maxrss across fork and exec.
    """
    model, _ = load(folder)
    with torch.no_grad():
        model(torch.randint(0, 1000, (4, 512)), use_cache=False)
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


def linear_macs(model) -> tuple[float, float]:
    """(decoder linears, LM head) multiply-adds per token."""
    result = inspect_model(model, None)
    decoder = sum(r["flops_vs_dense"] * r["shape"][0] * r["shape"][1] for r in result["rows"])
    head = model.get_output_embeddings()
    return decoder, head.in_features * head.out_features


def attention_macs(config, context: float) -> float:
    """QKᵀ and AV multiply-adds per token attending to `context` keys, all layers."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * heads * head_dim * context


def decode_rate(backend, prompt: torch.Tensor) -> float:
    """Tokens/s of STEPS greedy decode steps after a prefill of `prompt` (prefill not timed)."""
    logits, state = backend.prefill(prompt)
    start = time.perf_counter()
    for _ in range(STEPS):
        logits, state = backend.decode(logits[:, -1].argmax(-1, keepdim=True), state)
    return STEPS / (time.perf_counter() - start)


def build_models(work: Path, backends: list[str]) -> tuple[dict, dict, dict, object, object]:
    """Save dense and the two shrunk models (and their ONNX exports).

    Returns their folders, the shrunk-vs-masked logit checks, linear multiply-adds, the config and
    the tokenizer."""
    dense, tokenizer = loading.load(loading.SMOLLM2_ALIAS)
    calib = data.calibration_tokens("austen", tokenizer, nsamples=16, seqlen=256)
    prompt = data.windows(data.evaluation_tokens("austen", tokenizer), 512, 2)
    nets, manifests, check = {"dense": dense}, {"dense": {"storage": "masked"}}, {}
    for alpha in (0.0, 0.1):
        label = f"structured:0.3 α={alpha:g}"
        net = copy.deepcopy(dense)
        compress_model(net, calib, Pruning("thanos", "structured:0.3", {"alpha": alpha}))
        with torch.no_grad():
            masked = net(prompt).logits
            masked64 = copy.deepcopy(net).double()(prompt).logits
        specs = shrink_model(net, alpha=alpha)
        with torch.no_grad():
            shrunk = net(prompt).logits
            shrunk64 = copy.deepcopy(net).double()(prompt).logits
        check[label] = {
            "max_abs_logit_diff_fp32": float((shrunk - masked).abs().max()),
            "max_abs_logit_diff_fp64": float((shrunk64 - masked64).abs().max()),
            "fp32_vs_fp64_masked": float((masked.double() - masked64).abs().max()),
        }
        nets[label] = net
        manifests[label] = Manifest(storage="shrunk", modules=specs, pattern="structured:0.3", options={"alpha": alpha})
    folders = {}
    for i, (label, net) in enumerate(nets.items()):
        folders[label] = work / f"model{i}"
        save(net, tokenizer, folders[label], manifests[label])
        if "ort" in backends:
            (work / f"onnx{i}").mkdir()
            export_onnx(net, work / f"onnx{i}")
    return folders, check, {label: linear_macs(net) for label, net in nets.items()}, dense.config, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default="torch,ort", help="comma-separated: torch, ort")
    ap.add_argument("--peak-memory", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    if args.peak_memory:
        return peak_memory_child(args.peak_memory)
    backends = args.backends.split(",")

    work = Path(tempfile.mkdtemp(prefix="compact-speed-"))
    folders, check, macs, config, tokenizer = build_models(work, backends)
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), 512, 4)
    shapes = {"prefill 1x512": windows[:1], "prefill 4x512": windows}
    runners = {}
    for i, label in enumerate(folders):
        for kind in backends:
            target = str(folders[label] if kind == "torch" else work / f"onnx{i}")
            runners[kind, label] = open_backend(kind, target)
    times = {f"{kind} | {label}": {**{s: [] for s in shapes}, "decode tok/s": []} for kind, label in runners}
    for runner in runners.values():  # warm-up
        runner.prefill(windows[:1, :64])
    for _ in range(args.reps):
        for (kind, label), runner in runners.items():
            entry = times[f"{kind} | {label}"]
            for name, batch in shapes.items():
                t = time.perf_counter()
                runner.prefill(batch)
                entry[name].append(time.perf_counter() - t)
            entry["decode tok/s"].append(decode_rate(runner, windows[:1, :PROMPT]))

    peak = {}
    for label, folder in folders.items():
        child = subprocess.run([sys.executable, __file__, "--peak-memory", str(folder)], capture_output=True, text=True, check=True)
        peak[label] = float(child.stdout.strip().splitlines()[-1])
    size = {label: (folder / "model.safetensors").stat().st_size for label, folder in folders.items()}
    contexts = {"prefill 1x512": 256.5, "prefill 4x512": 256.5, "decode tok/s": PROMPT + STEPS / 2}
    model_flops = {label: {s: sum(macs[label]) + attention_macs(config, c) for s, c in contexts.items()} for label in folders}

    rows = []
    for key, entry in times.items():
        kind, label = key.split(" | ")
        base = times[f"{kind} | dense"]
        row = {"backend": kind, "model": label}
        for name, values in entry.items():
            med = statistics.median(values)
            ratio = med / statistics.median(base[name])  # prefill: time ratio; decode: tokens/s ratio
            row[name] = {"median": round(med, 4), "min": round(min(values), 4), "max": round(max(values), 4), "ratio_to_dense": round(ratio, 3)}
        row["linear_flops_vs_dense"] = round(macs[label][0] / macs["dense"][0], 3)
        row["model_flops_vs_dense"] = {s: round(model_flops[label][s] / model_flops["dense"][s], 3) for s in contexts}
        row["peak_rss_mib"] = round(peak[label])
        row["file_mib"] = round(size[label] / 2**20, 1)
        rows.append(row)

    table = markdown(rows, args.reps)
    print(table)
    for label, c in check.items():
        print(f"{label}: shrunk vs masked logits, max abs diff {c['max_abs_logit_diff_fp32']:.2e} in fp32 "
              f"({c['max_abs_logit_diff_fp64']:.1e} in fp64; fp32 vs fp64 of the masked model itself: {c['fp32_vs_fp64_masked']:.2e})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compact_speed.json").write_text(json.dumps({"rows": rows, "times": times, "logit_check": check, "threads": torch.get_num_threads(),
                                                              "torch": torch.__version__}, indent=2, ensure_ascii=False) + "\n")
    (args.out / "compact_speed.md").write_text(table)


def markdown(rows: list[dict], reps: int) -> str:
    def cell(r, name, unit, digits):
        m = r[name]
        return f"{m['median']:.{digits}f} {unit} [{m['min']:.{digits}f}–{m['max']:.{digits}f}] ({m['ratio_to_dense']:.2f}×)"

    lines = [
        f"SmolLM2-135M fp32, torch {torch.__version__} CPU, {torch.get_num_threads()} threads, {reps} interleaved repetitions: "
        "median [min–max], (ratio to dense, same backend, same run; decode as the speed-up in tokens/s)",
        "",
        "| backend | model | prefill 1×512 | prefill 4×512 | decode tok/s | model FLOPs prefill / decode | linear FLOPs | peak RSS | file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["model_flops_vs_dense"]
        lines.append(
            f"| {r['backend']} | {r['model']} | {cell(r, 'prefill 1x512', 's', 3)} | {cell(r, 'prefill 4x512', 's', 3)} "
            f"| {cell(r, 'decode tok/s', '', 1)} | {f['prefill 1x512']:.2f}× / {f['decode tok/s']:.2f}× | {r['linear_flops_vs_dense']:.2f}× "
            f"| {r['peak_rss_mib']} MiB | {r['file_mib']} MiB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
