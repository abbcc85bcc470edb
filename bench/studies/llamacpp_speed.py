"""Width-pruned SmolLM2 on llama.cpp: size, perplexity and speed against the dense model, per GGUF type.

    python bench/studies/llamacpp_speed.py [--work DIR] [--repetitions 5] [--recovered FOLDER]

Needs `make setup-llamacpp` (llama.cpp's tools and library, llama-cpp-python). Models (Thanos,
32 x 512 Austen calibration tokens), each exported with `thanos-deploy export gguf`:
- dense SmolLM2-135M;
- width:mlp=0.3,heads=0.33 at three roundings of the MLP width: none (1075 neurons, a perplexity
  check only), the default multiple of 64 (1088) and multiple=256 (1024), all with 6 of 9 query heads;
- 2:4 masked (for the perplexity check only: llama.cpp has no sparse kernels);
- optionally a recovered model (`--recovered`).

Per model and type (f16, q8_0, q4_k_m; f16 only for the 1075 and 2:4 checks): bytes, the tensors the tools kept at another type, and
perplexity measured by llama.cpp itself (llama-cpp-python on 4 x 512 tokens of Emma + Persuasion)
beside the torch artifact's on the same windows. Speed with llama-bench: prompt processing of 512
tokens and generation of 128, 2 threads, weight repacking off (`--repack 0`: its AMX path crashes on
this machine's CPU), one repetition per call, the calls interleaved over models and repetitions so
that drifts of this shared machine fall on every model alike; the ratio of medians against the dense
model of the same type, with a paired bootstrap interval and the spread of per-repetition ratios.

Writes bench/results/llamacpp-speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from thanos_deploy import data, loading
from thanos_deploy import llamacpp_build as llamacpp
from thanos_deploy.bench.timing import speedup
from thanos_deploy.evaluate import windows_perplexity
from thanos_deploy.exporters.gguf import export_gguf
from thanos_deploy.measure import machine, markdown_table, matmul_rate
from thanos_deploy.runtime.llamacpp import LlamaCppBackend

CLI = str(Path(sys.executable).with_name("thanos-deploy"))
WIDTH = "width:mlp=0.3,heads=0.33"
MODELS = {"dense": None, "width 1075 (no rounding)": f"{WIDTH},multiple=1", "width 1088 (multiple 64, default)": WIDTH,
          "width 1024 (multiple 256)": f"{WIDTH},multiple=256", "2:4 masked": "2:4"}
SPEED_MODELS = ("dense", "width 1088 (multiple 64, default)", "width 1024 (multiple 256)")
TYPES = ("f16", "q8_0", "q4_k_m")
PERPLEXITY_ONLY = {"2:4 masked": ("f16",), "width 1075 (no rounding)": ("f16",)}  # checks of the export, not speed rows
EVAL_WINDOWS, EVAL_SEQLEN = 4, 512


def folder_of(name: str, pattern: str | None, work: Path) -> Path:
    if pattern is None:
        return Path(loading.resolve(loading.SMOLLM2_ALIAS))
    out = work / name.split(" (")[0].replace(" ", "-").replace(":", "-")
    if not out.exists():
        subprocess.run([CLI, "compress", "smollm2-135m", "--method", "thanos", "--pattern", pattern, "--nsamples", "32", "--seqlen", "512",
                        "--out", str(out)], check=True, capture_output=True)
    return out


def decoder_fraction(folder: Path) -> float:
    """Decoder-linear parameters against dense SmolLM2's."""
    def linears(config) -> int:
        heads, kv, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return config.num_hidden_layers * (2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * config.intermediate_size)
    return linears(loading.load_config(str(folder))[1]) / linears(loading.load_config(loading.SMOLLM2_ALIAS)[1])


def bench_once(path: Path) -> dict:
    """One llama-bench call: tokens/s of pp512 and tg128 (one repetition each)."""
    done = subprocess.run([str(llamacpp.tool("llama-bench")), "-m", str(path), "-p", "512", "-n", "128", "-t", "2", "-r", "1", "--repack", "0",
                           "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    return {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "thanos-deploy" / "studies" / "llamacpp-speed")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--recovered", type=Path, default=None, help="also a recovered width model (a folder recover wrote)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {name: folder_of(name, pattern, args.work) for name, pattern in MODELS.items()}
    if args.recovered:
        folders["recovered"] = args.recovered
    tokenizer = AutoTokenizer.from_pretrained(loading.resolve(loading.SMOLLM2_ALIAS))
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), EVAL_SEQLEN, EVAL_WINDOWS)
    rows = {}
    for name, folder in folders.items():
        model, _ = loading.load(str(folder), dtype="float32")
        with torch.no_grad():
            torch_ppl = windows_perplexity(lambda batch: model(input_ids=batch).logits, windows)["perplexity"]
        for kind in PERPLEXITY_ONLY.get(name, TYPES):
            path = args.work / f"{folder.name}-{kind}.gguf"
            done = path.with_suffix(".json")  # an export of an earlier run of this study, with its report
            if done.is_file() and path.is_file():
                export = json.loads(done.read_text())
            else:
                export = export_gguf(str(folder), path, kind=kind, overwrite=True)
                done.write_text(json.dumps(export))
            backend = LlamaCppBackend(str(path), threads=2)
            ppl = windows_perplexity(lambda batch: backend.step(batch, None, None, None)[0], windows)["perplexity"]
            backend.llm.close()
            rows[(name, kind)] = {"model": name, "type": kind, "path": str(path), "bytes": export["bytes"], "export_seconds": export["seconds"],
                                  "kept": export["kept"], "perplexity_llamacpp": ppl, "perplexity_torch": torch_ppl,
                                  "perplexity_vs_torch": ppl / torch_ppl - 1, "decoder_fraction": decoder_fraction(folder)}
            print(f"{name:36s} {kind:7s} {export['bytes'] / 2**20:7.1f} MiB  ppl llama.cpp {ppl:8.3f} (torch {torch_ppl:.3f}, "
                  f"{100 * (ppl / torch_ppl - 1):+.2f} %)  kept {len(export['kept'])}", flush=True)
    speeds: dict = {}
    started = time.time()
    for rep in range(args.repetitions):
        for kind in TYPES:
            for name in SPEED_MODELS:
                for stage, rate in bench_once(Path(rows[(name, kind)]["path"])).items():
                    speeds.setdefault((name, kind, stage), []).append(rate)
        print(f"repetition {rep + 1}/{args.repetitions} done ({time.time() - started:.0f} s)", flush=True)
    table = []
    for kind in TYPES:
        for name in SPEED_MODELS:
            row = rows[(name, kind)]
            for stage in ("prefill", "decode"):
                rates = speeds[(name, kind, stage)]
                dense = speeds[("dense", kind, stage)]
                row[stage] = {"tokens_per_second": rates, "speedup": speedup([1 / r for r in dense], [1 / r for r in rates])}
            table.append(row)
    result = {"machine": {**machine(), "matmul_gflops": matmul_rate() / 1e9}, "repetitions": args.repetitions,
              "llama_bench": "-p 512 -n 128 -t 2 -r 1 --repack 0", "rows": list(rows.values())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp-speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"llama.cpp ({llamacpp.PACKAGE} {llamacpp.VERSION} sources), {args.repetitions} interleaved repetitions, 2 threads, "
             f"matmul {result['machine']['matmul_gflops']:.0f} GFLOP/s (torch fp32)", ""]
    lines += markdown_table(["type", "model", "decoder params", "MiB", "kept at another type", "ppl llama.cpp", "vs torch", "pp512 tok/s",
                             "prefill ×dense [95 %]", "tg128 tok/s", "decode ×dense [95 %]"],
                            [[r["type"], r["model"], f"{r['decoder_fraction']:.3f}", f"{r['bytes'] / 2**20:.1f}", str(len(r["kept"])),
                              f"{r['perplexity_llamacpp']:.2f}", f"{100 * r['perplexity_vs_torch']:+.2f} %",
                              f"{_median(r['prefill']['tokens_per_second']):.0f}", _ratio(r["prefill"]["speedup"]),
                              f"{_median(r['decode']['tokens_per_second']):.1f}", _ratio(r["decode"]["speedup"])] for r in table])
    lines += ["", "Perplexity of every export (llama.cpp against torch on the same windows):", ""]
    lines += markdown_table(["model", "type", "ppl llama.cpp", "ppl torch", "difference", "kept"],
                            [[r["model"], r["type"], f"{r['perplexity_llamacpp']:.3f}", f"{r['perplexity_torch']:.3f}",
                              f"{100 * r['perplexity_vs_torch']:+.2f} %", ", ".join(sorted({k["tensor"].split(".", 2)[-1] for k in r["kept"]})) or "none"]
                             for r in rows.values()])
    (args.out / "llamacpp-speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _ratio(s: dict) -> str:
    return f"{s['ratio']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
