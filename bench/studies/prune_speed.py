"""Time the per-layer pruning math alone (no forward passes): Wanda, SparseGPT and Thanos.

    python bench/studies/prune_speed.py [--shapes smollm2|llama2-7b|all] [--patterns 2:4,unstructured:0.5] [--block-size 512]

Shapes are SmolLM2-135M's linears and LLaMA-2-7B's (4096x4096, 11008x4096, 4096x11008), with a
synthetic positive-definite Hessian (low rank plus diagonal, like real activations). Each method
runs on the same inputs in one process; the table gives seconds and the ratio Thanos/SparseGPT.

It also times Thanos's solve stage alone (the per-row systems of `_principal_solve`: gathers,
factorisations, triangular solves) and prints its GFLOP/s, counting per solved system of size s
(padding excluded) s³/3 flops for the Cholesky factorisation and 2s² for the two triangular solves,
next to this machine's fp32 GEMM rate measured in the same run (one 2048² matmul, and a batch of
256 products of 256² matrices: the shape of the systems). Writes bench/results/prune_speed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from thanos_deploy.methods import get_method, thanos
from thanos_deploy.methods.stats import Stats
from thanos_deploy.patterns import parse_pattern

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}
METHODS = ("wanda", "sparsegpt", "thanos")


def synthetic(rows: int, cols: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    V = torch.randn(cols, 256, generator=g) * torch.rand(cols, 1, generator=g)
    H = V @ V.T + torch.diag(torch.rand(cols, generator=g) + 0.05)
    W = torch.randn(rows, cols, generator=g) * 0.02
    H = H.to(device)
    return W.to(device), Stats(sq_norms=H.diagonal().clone(), hessian=H, tokens=cols)


class SolveStage:
    """Wraps thanos._principal_solve to add up its seconds and the flops of the systems it solves."""

    def __init__(self, device):
        self.device, self.seconds, self.flops = device, 0.0, 0.0
        self.inner = thanos._principal_solve
        thanos._principal_solve = self

    def __call__(self, M, rhs, mask, row_batch):
        sizes = mask.sum(1).double()
        self.flops += float((sizes.pow(3) / 3 + 2 * sizes.square()).sum())
        out = None

        def run():
            nonlocal out
            out = self.inner(M, rhs, mask, row_batch)

        self.seconds += timed(run, self.device)
        return out

    def reset(self) -> None:
        self.seconds, self.flops = 0.0, 0.0


def gemm_gflops(device) -> dict:
    """fp32 GEMM rates on this machine now: one 2048² product and 256 batched 256² products."""
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(256, 256, 256, device=device)
    timed(lambda: a @ a, device), timed(lambda: torch.bmm(b, b), device)
    return {
        "matmul_2048": 2 * 2048**3 / min(timed(lambda: a @ a, device) for _ in range(3)) / 1e9,
        "bmm_256x256^2": 2 * 256**4 / min(timed(lambda: torch.bmm(b, b), device) for _ in range(3)) / 1e9,
    }


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="all", choices=[*SHAPES, "all"])
    ap.add_argument("--patterns", default="2:4,unstructured:0.5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=1, help="take the fastest of this many runs")
    ap.add_argument("--block-size", type=int, default=512, help="Thanos's B")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = [s for k, v in SHAPES.items() if args.shapes in (k, "all") for s in v]
    rows_out = []
    solve = SolveStage(device)
    gemm = gemm_gflops(device)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, Thanos B = {args.block_size}; seconds of pruning math per linear")
    print(f"fp32 GEMM now: 2048² matmul {gemm['matmul_2048']:.0f} GFLOP/s, 256 x 256² bmm {gemm['bmm_256x256^2']:.0f} GFLOP/s")
    print(f"{'shape':>12} {'pattern':>17} " + " ".join(f"{m:>10}" for m in METHODS) + f" {'thanos/sgpt':>12} {'solve s':>8} {'solve GFLOP/s':>14}")
    for rows, cols in shapes:
        W, stats = synthetic(rows, cols, device)
        for spec in args.patterns.split(","):
            pattern = parse_pattern(spec)
            seconds = {}
            for name in METHODS:
                m = get_method(name)
                opts = m.options(pattern, {"block_size": args.block_size} if name == "thanos" else {})
                timed(lambda: m.prune(W[:64], stats, pattern, **opts), device)  # warm-up
                runs = []
                for _ in range(args.repeats):
                    solve.reset()
                    runs.append((timed(lambda: m.prune(W, stats, pattern, **opts), device), solve.seconds, solve.flops))
                seconds[name], solve_seconds, solve_flops = min(runs)
            ratio = seconds["thanos"] / seconds["sparsegpt"]
            gflops = solve_flops / solve_seconds / 1e9 if solve_seconds else float("nan")
            rows_out.append({"shape": [rows, cols], "pattern": spec, "seconds": seconds, "thanos_over_sparsegpt": ratio,
                             "solve_seconds": solve_seconds, "solve_gflop": solve_flops / 1e9, "solve_gflops_per_s": gflops})
            print(f"{rows:>5}x{cols:<6} {spec:>17} " + " ".join(f"{seconds[m]:>10.3f}" for m in METHODS)
                  + f" {ratio:>12.2f} {solve_seconds:>8.3f} {gflops:>14.1f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"prune_speed-{device.type}" + ("" if args.block_size == 512 else f"-B{args.block_size}")
    (args.out / f"{name}.json").write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "block_size": args.block_size,
                                                     "gemm_gflops_per_s": gemm, "results": rows_out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
