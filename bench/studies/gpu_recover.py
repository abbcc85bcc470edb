"""Sharded `recover` on one GPU: a random model with Llama-3.2-1B's shape (SmolLM2's tokenizer and
vocabulary, so the Austen text trains it), pruned 2:4 by magnitude, distilled from its dense self
for a few steps; prints the memory plan, the peak CUDA memory measured, the bytes each process holds
of parameters, gradients and optimizer states, and tokens per second. `--check` runs a 2-layer
cut on the CPU (the path, not the speed).

    python bench/studies/gpu_recover.py [--tokens 65536] [--batch-size 8] [--seqlen 1024] [--check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from thanos_deploy import loading

CLI = str(Path(sys.executable).with_name("thanos-deploy"))
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
             rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65_536, help="training tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--check", action="store_true", help="a 2-layer cut on the CPU, 2 steps of 2 x 64 tokens")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    device = "cpu" if args.check else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu-recover-"))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(loading.resolve(loading.SMOLLM2_ALIAS))
        config = transformers.LlamaConfig(**{**SHAPE, **({"num_hidden_layers": 2} if args.check else {})}, vocab_size=len(tokenizer))
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "dense")
        tokenizer.save_pretrained(work / "dense")
        subprocess.run([CLI, "compress", str(work / "dense"), "--method", "magnitude", "--pattern", "2:4", "--nsamples", "4", "--seqlen", "64",
                        "--device", device, "--out", str(work / "student")], check=True, capture_output=True)
        budget = ["--tokens", "256", "--batch-size", "2", "--seqlen", "64", "--eval-windows", "1"] if args.check else \
            ["--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen)]
        done = subprocess.run([CLI, "recover", str(work / "student"), *budget, "--device", device, "--out", str(work / "recovered")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: recover failed:\n{done.stderr[-3000:]}")
        log = json.loads((work / "recovered" / "recovery.json").read_text())
        summary = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "tokens_per_s": log["tokens_per_s"],
                   "matmul_fraction": log["matmul_fraction"], "plan_total_bytes": log["plan"]["total"], "plan": log["plan"],
                   "peak_device_bytes": log.get("peak_device_bytes"), "shard_bytes": log["shard_bytes"], "perplexity": [e["perplexity"] for e in log["log"]]}
        print(done.stdout[-2000:])
        print(json.dumps({k: v for k, v in summary.items() if k != "plan"}, indent=2))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu-recover{'-check' if args.check else ''}.json").write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
