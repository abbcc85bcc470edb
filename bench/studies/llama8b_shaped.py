"""An 8B model from end to end on this machine: a random model with Llama-3-8B's config, pruned with
`compress --offload` in float32 (32 GB of weights, more than this machine's memory), and the memory
plan of `recover` for it on common GPU sets.

    python bench/studies/llama8b_shaped.py [--work DIR] [--keep] [--calibration 8x512]

1. Writes the model in bfloat16 as sharded safetensors (16 GB; random weights, std 0.02), with
   random calibration tokens (no tokenizer is needed). Checks the free disk first (about 40 GB:
   the model, the pruned outputs in bfloat16, the staging folder) and skips with the reason when
   there is too little.
2. `compress --offload --dtype float32`: magnitude 2:4 over all 32 layers, and Thanos 2:4 on the first
   three layers (--targets; the other layers only run forward). Seconds per layer from the
   manifest, peak RSS from /usr/bin/time, against the float32 model's 32.1 GB.
3. Width (MLP 0.25 and heads 0.25) on a three-layer cut of the same model, in memory: narrowing
   to a plain config needs the whole model, so width does not run under --offload.
4. `recover --plan-only` for the 8B model on 1 × 80 GB (CPU offload and gradient checkpointing),
   8 × 80 GB and 8 × 141 GB, 8 × 2048 tokens a step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from thanos_deploy.artifact import INDEX, TensorWriter

CLI = str(Path(sys.executable).with_name("thanos-deploy"))
CONFIG = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
              vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5)
FLOAT32_BYTES = 4 * 8_030_261_248
NEEDED_DISK = 40e9


def write_model(folder: Path, layers: int | None = None, source: Path | None = None) -> None:
    """The random model in bfloat16, one shard per decoder layer plus one for the rest; with
    `source`, a cut of its first `layers` layers that reads the same shard files."""
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**{**CONFIG, **({"num_hidden_layers": layers} if layers else {})}, dtype="bfloat16")
    config.save_pretrained(folder)
    if source is not None:
        index = json.loads((source / INDEX).read_text())
        keep = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
        for file in set(keep.values()):
            os.symlink(source / file, folder / file)
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": keep}))
        return
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, tensor in model.state_dict().items():
        shard = f"model-{int(name.split('.')[2]):05d}.safetensors" if name.startswith("model.layers.") else "model-rest.safetensors"
        groups.setdefault(shard, []).append((name, tensor.shape))
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard, tensors in groups.items():
        with TensorWriter(folder / shard, len(tensors)) as out:
            for name, shape in tensors:
                value = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
                out.append(value.to(torch.bfloat16), name=name)
                weight_map[name] = shard
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS bytes, stdout) of a command in a fresh process."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024.0, done.stdout


def per_layer(out: Path) -> dict:
    """Median seconds per layer of each stage, over the layers the run pruned (and over all of them)."""
    layers = json.loads((out / "thanos_deploy.json").read_text())["layers"]
    pruned = [layer for layer in layers if layer["linears"]]
    return {"pruned_layers": len(pruned), **{f"{stage}_median_s": round(statistics.median(layer["seconds"][stage] for layer in pruned), 2)
                                              for stage in ("statistics", "prune", "forward")},
            "forward_median_s_all_layers": round(statistics.median(layer["seconds"]["forward"] for layer in layers), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the model and outputs (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the model and outputs")
    ap.add_argument("--calibration", default="8x512", help="calibration windows x tokens (random ids)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llama8b-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < NEEDED_DISK and not (work / "model" / INDEX).is_file():
        print(f"skipped: {free / 1e9:.0f} GB free under {work}, {NEEDED_DISK / 1e9:.0f} GB needed (the model, the outputs, the staging folder)")
        return
    results = {"float32_model_bytes": FLOAT32_BYTES}
    try:
        model = work / "model"
        if not (model / INDEX).is_file():
            t0 = time.perf_counter()
            write_model(model)
            results["write_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"wrote the 8B-shaped model in {results['write_seconds']:.0f} s", flush=True)
        n, seqlen = (int(v) for v in args.calibration.split("x"))
        ids = work / "ids.safetensors"
        save_file({"input_ids": torch.randint(0, CONFIG["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(1))}, ids)
        common = ["--offload", "--dtype", "float32", "--save-dtype", "bfloat16", "--calib-tokens", str(ids), "--overwrite"]
        runs = {"magnitude 2:4, 32 layers": ["--method", "magnitude", "--pattern", "2:4"],
                "thanos 2:4, layers 0-2": ["--method", "thanos", "--pattern", "2:4", "--targets", r"re:model\.layers\.[0-2]\."]}
        for label, flags in runs.items():
            out = work / re.sub(r"\W+", "-", label)
            seconds, peak, _ = timed([CLI, "compress", str(model), *flags, *common, "--out", str(out)])
            results[label] = {"seconds": round(seconds, 1), "peak_rss_bytes": peak, "peak_vs_float32_model": round(peak / FLOAT32_BYTES, 3),
                              **per_layer(out)}
            print(f"{label}: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB ({peak / FLOAT32_BYTES:.3f} of the float32 model), {results[label]}", flush=True)
            shutil.rmtree(out)
        cut = work / "cut"
        if not cut.exists():
            write_model(cut, layers=3, source=model)
        out = work / "width"
        seconds, peak, _ = timed([CLI, "compress", str(cut), "--method", "thanos", "--pattern", "width:mlp=0.25,heads=0.25", "--dtype", "float32",
                                  "--no-offload", "--calib-tokens", str(ids), "--overwrite", "--out", str(out)])
        results["width mlp=0.25,heads=0.25, 3-layer cut, in memory"] = {"seconds": round(seconds, 1), "peak_rss_bytes": peak, **per_layer(out),
                                                                          "config": json.loads((out / "config.json").read_text())["intermediate_size"]}
        print(f"width, 3-layer cut: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB, {results['width mlp=0.25,heads=0.25, 3-layer cut, in memory']}", flush=True)
        shutil.rmtree(out)
        plans = {"1 x 80 GB, CPU offload, gradient checkpointing": ["--nproc", "1", "--device-memory", "80GB", "--cpu-offload", "--gradient-checkpointing"],
                 "8 x 80 GB": ["--nproc", "8", "--device-memory", "80GB"], "8 x 141 GB": ["--nproc", "8", "--device-memory", "141GB"]}
        for label, flags in plans.items():
            done = subprocess.run([CLI, "recover", str(model), "--plan-only", "--json", "--batch-size", "8", "--seqlen", "2048", *flags],
                                  capture_output=True, text=True, check=True)
            plan = json.loads(done.stdout)
            results[f"recover plan, {label}"] = plan
            print(f"recover plan, {label}: {plan['total'] / 1e9:.1f} GB a GPU ({'fits' if plan['fits'] else 'does not fit'}), "
                  f"host {sum(plan['host'].values()) / 1e9:.1f} GB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llama8b-shaped.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
