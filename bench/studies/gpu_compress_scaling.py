"""Thanos 2:4 on a random LLaMA-2-7B-shaped model: one GPU against all of them (issue 21's target:
at least 1.7x at 2 GPUs).

    python bench/studies/gpu_compress_scaling.py                     # every GPU, 4 layers, 128 x 2048 tokens
    python bench/studies/gpu_compress_scaling.py --layers 8 --nsamples 64
    python bench/studies/gpu_compress_scaling.py --check             # CPU smoke test: tiny shapes, 2 gloo processes

Writes a random bfloat16 model of LLaMA-2-7B's shapes (hidden 4096, MLP 11008, 32 heads; `--layers`
of its 32 decoder layers, so a run fits the time a GPU is lent for) and random calibration tokens,
then runs the installed `thanos-deploy compress` on it with 1 and N processes (`--nproc`, one GPU
each), interleaved `--repeats` times, and reports each run's stages from its manifest (statistics,
pruning math, forward, communication), the speed-up of N over 1 (medians), and the per-linear
solve seconds of the one-process runs (what bench/studies/scale_projection.py projects from).
Writes bench/results/gpu_compress_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096}
TINY = {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 1000, "max_position_embeddings": 512}


def write_model(folder: Path, shape: dict, layers: int, dtype: torch.dtype) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_hidden_layers=layers)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)


def compress(folder: Path, ids: Path, out: Path, processes: int, device: str) -> dict:
    cli = str(Path(sys.executable).with_name("thanos-deploy"))
    command = [cli, "compress", str(folder), "--calib-tokens", str(ids), "--method", "thanos", "--pattern", "2:4",
               "--device", device, "--out", str(out), "--overwrite", *(["--nproc", str(processes)] if processes > 1 else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "thanos_deploy.json").read_text())
    solves: dict[str, list[float]] = {}
    for layer in manifest["layers"]:
        for entry in layer["linears"]:
            solves.setdefault("x".join(map(str, entry["shape"])), []).append(entry["seconds"])
    return {**manifest["seconds"], "solve_seconds": {k: statistics.median(v) for k, v in solves.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--processes", type=int, default=0, help="the N to compare with 1 (default: every GPU)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="tiny shapes on CPU with 2 gloo processes: that the script runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    if args.check:
        shape, device, dtype, n = TINY, "cpu", torch.float32, args.processes or 2
        args.nsamples, args.seqlen, args.layers = 8, 64, 2
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device: run with --check for the CPU smoke test")
        shape, device, dtype, n = LLAMA2_7B, "cuda", torch.bfloat16, args.processes or torch.cuda.device_count()
    if n < 2:
        raise SystemExit(f"error: {n} GPU(s): the comparison needs 2 or more (--processes)")

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder, ids = Path(tmp) / "model", Path(tmp) / "ids.safetensors"
        write_model(folder, shape, args.layers, dtype)
        g = torch.Generator().manual_seed(0)
        save_file({"input_ids": torch.randint(0, shape["vocab_size"], (args.nsamples, args.seqlen), generator=g)}, ids)
        runs: dict[int, list[dict]] = {1: [], n: []}
        print(f"random LLaMA-2-7B-shaped model ({args.layers} layers) {dtype}, {args.nsamples}x{args.seqlen} tokens, {device}" if not args.check
              else "check: tiny model on CPU")
        print(f"{'processes':>9}{'statistics':>11}{'prune':>8}{'forward':>9}{'comm.':>7}{'total':>8}  (seconds)")
        for _ in range(args.repeats):
            for processes in (1, n):
                r = compress(folder, ids, Path(tmp) / f"out-{processes}", processes, device)
                runs[processes].append(r)
                print(f"{processes:>9}{r['statistics']:>11.1f}{r['prune']:>8.1f}{r['forward']:>9.1f}{r.get('communication', 0.0):>7.1f}{r['total']:>8.1f}", flush=True)
    one, many = (statistics.median(r["total"] for r in runs[k]) for k in (1, n))
    print(f"speed-up of {n} processes over 1: {one / many:.2f}x (medians of {args.repeats}; target at 2 GPUs: 1.7x)")
    result = {"layers": args.layers, "calibration": f"{args.nsamples}x{args.seqlen}", "device": device, "processes": n, "runs": runs,
              "speedup": one / many, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else [],
              "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_compress_scaling{'-check' if args.check else ''}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
