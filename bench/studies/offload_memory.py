"""Peak memory of `compress` in memory, with --offload, and with --offload --activations-on-disk,
on a random Llama saved to disk.

Each run is a child process (the installed CLI's main()); it reports its resident memory after the
imports (the interpreter's baseline) and its peak (VmHWM) at exit. Prints the peaks above the
baseline, the model's size on disk, the ratios, and whether the outputs are byte-identical.

    python bench/studies/offload_memory.py                    # issue 12's model: 32 layers, hidden 1024, intermediate 2816, fp32: 1.6 GB, Wanda 2:4
    python bench/studies/offload_memory.py --nsamples 128 --seqlen 512   # activations (512 MiB in and out of a layer) outweigh a layer
    python bench/studies/offload_memory.py --method thanos    # Thanos 2:4 (minutes per layer on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import atexit
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parents[1] / "results"


def _status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def child(argv: list[str]) -> None:
    """Run the CLI in this process; print {"baseline_kib", "peak_kib"} as the last line of stderr.

    The baseline is taken after importing the CLI and the Llama modelling code (transformers
    imports it lazily, about 110 MB): code both runs load, not model data."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    from thanos_deploy.cli import main

    baseline = _status_kib("VmRSS")
    atexit.register(lambda: print(json.dumps({"baseline_kib": baseline, "peak_kib": _status_kib("VmHWM")}), file=sys.stderr))
    sys.exit(main(argv))


def make_model(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).float().save_pretrained(folder)


def run(args: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child failed:\n{r.stderr[-3000:]}")
    result = json.loads(r.stderr.strip().splitlines()[-1])
    return {**result, "seconds": round(time.perf_counter() - t0, 1), "above_baseline_mib": (result["peak_kib"] - result["baseline_kib"]) / 1024}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8192, help="small, so embeddings + head weigh what they do in a 7B model (4 %%)")
    parser.add_argument("--method", default="wanda", help="wanda (default: minutes on 2 CPU cores); thanos adds its fp32 Hessians "
                        "(b x b per input group, 32 MB at b = 2816) and takes minutes per layer there")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", args.layers, args.hidden, args.intermediate, args.vocab)
        size = sum(p.stat().st_size for p in (tmp / "model").glob("*.safetensors"))
        ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, tmp / "ids.safetensors")
        common = ["compress", str(tmp / "model"), "--method", args.method, "--pattern", "2:4", "--calib-tokens", str(tmp / "ids.safetensors")]
        runs = {
            "in memory": run([*common, "--no-offload", "--activations-in-memory", "--out", str(tmp / "in-memory")]),
            "--offload": run([*common, "--offload", "--activations-in-memory", "--out", str(tmp / "offload")]),
            "--offload --activations-on-disk": run([*common, "--offload", "--activations-on-disk", "--out", str(tmp / "on-disk")]),
        }
        names = sorted(p.name for p in (tmp / "in-memory").glob("*.safetensors"))
        identical = all(
            names == sorted(p.name for p in (tmp / other).glob("*.safetensors"))
            and all((tmp / "in-memory" / n).read_bytes() == (tmp / other / n).read_bytes() for n in names)
            for other in ("offload", "on-disk")
        )

    activations_mib = 2 * args.nsamples * args.seqlen * args.hidden * 4 / 2**20  # fp32, into and out of a layer
    row = {
        "model": f"random Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, fp32",
        "model_mib": round(size / 2**20, 1),
        "method": f"{args.method} 2:4, {args.nsamples}x{args.seqlen} tokens",
        "activations_mib": activations_mib,
        "runs": {label: {**r, "peak_vs_model": round(r["above_baseline_mib"] * 2**20 / size, 3)} for label, r in runs.items()},
        "outputs_byte_identical": identical,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "offload_memory.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"{row['model']}: {row['model_mib']} MiB on disk; {row['method']} "
          f"(activations {activations_mib:.0f} MiB in and out of a layer); peak RSS above the interpreter's baseline:")
    print("| run | peak above baseline | × model size | seconds |")
    print("|---|---|---|---|")
    for label, r in row["runs"].items():
        print(f"| {label} | {r['above_baseline_mib']:.0f} MiB | {r['peak_vs_model']:.2f} | {r['seconds']} |")
    print(f"outputs byte-identical: {'yes' if identical else 'NO'}; target: offload peak < 0.25 × model size: "
          f"{'met' if row['runs']['--offload']['peak_vs_model'] < 0.25 else 'NOT met'}")


if __name__ == "__main__":
    main()
