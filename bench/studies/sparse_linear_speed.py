"""One linear layer, dense vs 2:4 semi-structured (cuSPARSELt and CUTLASS), on CUDA.

    python bench/studies/sparse_linear_speed.py [--out bench/results]

LLaMA-2-7B and 70B weight shapes [out, in] at 1 to 8192 tokens, fp16 and bf16. The 2:4 weight
goes through torch.sparse.to_sparse_semi_structured; SparseSemiStructuredTensor._FORCE_CUTLASS
picks CUTLASS, otherwise cuSPARSELt runs where torch was built with it. Timings are
torch.utils.benchmark.Timer(...).timeit(n).median (the maintainers' advice for these kernels, not
blocked_autorange), in one run; speed-up = dense time / sparse time. Target: >= 1.3x at prefill
shapes (>= 2048 tokens) on the 7B layers. Writes sparse_linear_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
from torch.utils.benchmark import Timer

SHAPES = {  # [out, in] of the linears: q/o, gate/up, down; 70B adds its grouped k/v
    "7B q/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "70B q/o": (8192, 8192), "70B k/v": (1024, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}
TOKENS = (1, 16, 64, 256, 1024, 2048, 4096, 8192)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def two_four_weight(out: int, inp: int, dtype) -> torch.Tensor:
    """A random weight with exactly 2 zeros in every group of 4 along the input axis."""
    w = torch.randn(out, inp, device="cuda", dtype=dtype)
    keep = torch.rand(out, inp // 4, 4, device="cuda").argsort(-1)[..., :2]
    mask = torch.zeros(out, inp // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True)
    return w * mask.reshape(out, inp)


def median_seconds(weight, x, iters: int) -> float:
    return Timer("F.linear(x, w)", globals={"F": F, "x": x, "w": weight}).timeit(iters).median


def backends() -> list[str]:
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return (["cusparselt"] if cusparselt is not None and cusparselt.is_available() else []) + ["cutlass"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    kinds = backends()
    for dtype_name, dtype in DTYPES.items():
        for shape_name, (out, inp) in SHAPES.items():
            dense = two_four_weight(out, inp, dtype)
            sparse = {}
            for kind in kinds:
                SparseSemiStructuredTensor._FORCE_CUTLASS = kind == "cutlass"
                sparse[kind] = to_sparse_semi_structured(dense)
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
            for tokens in TOKENS:
                x = torch.randn(tokens, inp, device="cuda", dtype=dtype)
                iters = 200 if tokens <= 256 else 50
                row = {"dtype": dtype_name, "shape": shape_name, "out": out, "in": inp, "tokens": tokens,
                       "dense_ms": median_seconds(dense, x, iters) * 1e3}
                reference = F.linear(x, dense).float()
                for kind, w in sparse.items():
                    row[f"{kind}_ms"] = median_seconds(w, x, iters) * 1e3
                    row[f"{kind}_speedup"] = row["dense_ms"] / row[f"{kind}_ms"]
                    row[f"{kind}_max_rel_err"] = float((F.linear(x, w).float() - reference).abs().max() / reference.abs().max())
                rows.append(row)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    header = ["dtype", "shape", "tokens", "dense ms"] + [f"{k} ms (speed-up)" for k in kinds]
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; Timer.timeit median; "
             f"speed-up = dense / 2:4", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['shape']} {r['out']}×{r['in']} | {r['tokens']} | {r['dense_ms']:.3f} | "
                     + " | ".join(f"{r[f'{k}_ms']:.3f} ({r[f'{k}_speedup']:.2f}×)" for k in kinds) + " |")
    prefill_7b = [r for r in rows if r["shape"].startswith("7B") and r["tokens"] >= 2048]
    best = {k: min(r[f"{k}_speedup"] for r in prefill_7b) for k in kinds}
    lines += ["", "target: 2:4 speed-up >= 1.3x at prefill shapes (>= 2048 tokens) on the 7B layers; lowest measured: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in best.items())]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()), "torch": torch.__version__,
            "cuda": torch.version.cuda, "backends": kinds}
    (args.out / "sparse_linear_speed.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "sparse_linear_speed.md").write_text(table)


if __name__ == "__main__":
    main()
