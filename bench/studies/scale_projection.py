"""The reviewers' question, "what does Thanos cost at 70B?": a projection of Thanos 2:4's wall-clock
on LLaMA-2-7B, 13B and 70B, on 1 and 8 GPUs, from measured per-linear solve times.

    python bench/studies/scale_projection.py                       # measures this CPU's solves, then projects
    python bench/studies/scale_projection.py --gpu-figures bench/results/gpu_compress_scaling.json

The model, each assumption printed next to its result:
- solves: one linear's pruning math (c rows, b inputs, B = 512) takes k₁·b³ (factorisation) +
  k₂·c·b² (the GEMM updates) + k₃·c·b (the per-row systems) seconds; the k are fitted per device on
  measured linears (this machine: timed here, SmolLM2's and LLaMA-2-7B's shapes; GPU: an H200's
  three LLaMA-2-7B shapes, from docs/speed.md, unless --gpu-figures brings a newer run), and the
  fit's error on the measured shapes is printed. 13B and 70B are extrapolations of that fit;
- passes: per token and layer, the forward (every linear and causal attention) twice and the
  statistics' Gram products XᵀX, at a fraction of a stated matmul rate;
- N processes: each pass takes 1/N; each layer's solves take the largest load of the cost-balanced
  plan (distributed.World.assign: one linear is never split); the Hessians' all-gather moves
  (N-1)/N of them to every GPU at a stated bandwidth.
Writes bench/results/scale_projection.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from thanos_deploy.measure import matmul_rate
from thanos_deploy.methods import get_method
from thanos_deploy.methods.stats import Stats
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.pipeline.distributed import World

MODELS = {  # hidden, MLP, layers, heads, kv heads
    "LLaMA-2-7B": (4096, 11008, 32, 32, 32),
    "LLaMA-2-13B": (5120, 13824, 40, 40, 40),
    "LLaMA-2-70B": (8192, 28672, 80, 64, 8),
}
# H200, torch 2.11, bench/studies/prune_speed.py --device cuda (docs/speed.md, "Pruning math per linear"), Thanos 2:4, B = 512
H200_SOLVES = {(4096, 4096): 0.217, (11008, 4096): 0.582, (4096, 11008): 0.654}
GPU = {"fp32_matmul": 67e12, "bf16_matmul": 989e12, "efficiency": 0.6, "link_bytes_per_s": 200e9}  # H200 spec sheet, assumed fractions
TOKENS = 128 * 2048
CPU_SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]


def linears(hidden: int, mlp: int, heads: int, kv: int) -> dict[str, tuple[int, int]]:
    kv_width = hidden // heads * kv
    return {"q": (hidden, hidden), "k": (kv_width, hidden), "v": (kv_width, hidden), "o": (hidden, hidden),
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}


def time_solve(rows: int, cols: int) -> float:
    """Seconds of Thanos 2:4's math on one synthetic linear (a positive-definite H like real activations')."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(cols, 256, generator=g) * torch.rand(cols, 1, generator=g)
    H = V @ V.T + torch.diag(torch.rand(cols, generator=g) + 0.05)
    W = torch.randn(rows, cols, generator=g) * 0.02
    stats = Stats(sq_norms=H.diagonal().clone(), hessian=H, tokens=cols)
    method = get_method("thanos")
    pattern = parse_pattern("2:4")
    t0 = time.perf_counter()
    method.prune(W, stats, pattern, **method.options(pattern, {}))
    return time.perf_counter() - t0


TERMS = ("b³", "c·b²", "c·b")  # factorisation; the GEMM updates; the per-row systems of size ≤ B (fixed B)


def terms(c: int, b: int) -> list[float]:
    return [float(b) ** 3, float(c) * b * b, float(c) * b]


def fit(measured: dict[tuple[int, int], float]) -> tuple[list[float], dict]:
    """Seconds per term of t = k₁·b³ + k₂·c·b² + k₃·c·b, least squares on the relative errors
    (terms that would come out negative are dropped), and each shape's error of the fit."""
    keep = list(range(len(TERMS)))
    while True:
        A = torch.tensor([[terms(c, b)[j] / t for j in keep] for (c, b), t in measured.items()], dtype=torch.float64)
        k = torch.linalg.lstsq(A, torch.ones(len(measured), 1, dtype=torch.float64)).solution.squeeze(1)
        if bool((k >= 0).all()):
            break
        keep.pop(int(torch.argmin(k)))
    coefficients = [0.0] * len(TERMS)
    for j, value in zip(keep, k.tolist()):
        coefficients[j] = value
    return coefficients, {f"{c}x{b}": round(seconds(coefficients, c, b) / t - 1, 3) for (c, b), t in measured.items()}


def seconds(k: list[float], c: int, b: int) -> float:
    return sum(x * y for x, y in zip(k, terms(c, b)))


def project(name: str, k: list[float], processes: int, gram_rate: float, forward_rate: float, link: float | None) -> dict:
    hidden, mlp, layers, heads, kv = MODELS[name]
    shapes = linears(hidden, mlp, heads, kv)
    solve = {n: seconds(k, c, b) for n, (c, b) in shapes.items()}
    owner = World(0, processes).assign(solve)
    solves = max(sum(t for n, t in solve.items() if owner[n] == r) for r in range(processes)) * layers
    macs = sum(c * b for c, b in shapes.values()) + 2 * hidden * 2048 / 2  # + causal attention over 1024 positions on average
    gram = sum(b * b for b in (hidden, hidden, hidden, mlp))  # the inputs of q/k/v, o, gate/up, down
    passes = TOKENS * layers * (2 * 2 * macs / forward_rate + 2 * gram / gram_rate) / processes
    hessian_bytes = 4 * (3 * hidden * hidden + mlp * mlp)
    communication = layers * hessian_bytes * (processes - 1) / link if link and processes > 1 else 0.0
    return {"solves_s": solves, "passes_s": passes, "communication_s": communication, "total_s": solves + passes + communication}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-figures", type=Path, default=None, help="gpu_compress_scaling.json: its one-GPU solve seconds replace the H200 table")
    ap.add_argument("--cpu-shapes", default="all", choices=["all", "small"], help="small: SmolLM2's shapes only (quick)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()

    rate = matmul_rate("cpu")
    shapes = CPU_SHAPES if args.cpu_shapes == "all" else CPU_SHAPES[:3]
    cpu = {}
    for shape in shapes:
        cpu[shape] = time_solve(*shape)
        print(f"this CPU: Thanos 2:4 on {shape[0]}x{shape[1]}: {cpu[shape]:.2f} s", flush=True)
    k_cpu, cpu_errors = fit(cpu)
    print(f"this CPU (float32 matmul {rate / 1e9:.0f} GFLOP/s): seconds per {', '.join(TERMS)}: {', '.join(f'{v:.2e}' for v in k_cpu)}; "
          f"fit error per shape {cpu_errors}")

    gpu_solves, source = H200_SOLVES, "H200, docs/speed.md (torch 2.11)"
    if args.gpu_figures:
        figures = json.loads(args.gpu_figures.read_text())
        one = figures["runs"]["1"][0]["solve_seconds"]
        gpu_solves = {tuple(int(v) for v in key.split("x")): t for key, t in one.items()}
        source = f"{', '.join(figures['gpus'][:1])}, {args.gpu_figures}"
    k_gpu, gpu_errors = fit(gpu_solves)
    print(f"GPU solves from {source}: seconds per {', '.join(TERMS)}: {', '.join(f'{v:.2e}' for v in k_gpu)}; fit error per shape {gpu_errors}")
    print(f"GPU passes assumed: Gram products at {GPU['efficiency']:.0%} of {GPU['fp32_matmul'] / 1e12:.0f} TFLOP/s float32, forward at "
          f"{GPU['efficiency']:.0%} of {GPU['bf16_matmul'] / 1e12:.0f} TFLOP/s bfloat16; Hessians all-gathered at {GPU['link_bytes_per_s'] / 1e9:.0f} GB/s; "
          f"calibration {TOKENS} tokens (128 x 2048)")
    rows = []
    print(f"\n{'model':<13}{'GPUs':>5}{'solves':>9}{'passes':>9}{'comm.':>8}{'total':>9}  (minutes)")
    for name in MODELS:
        for processes in (1, 8):
            p = project(name, k_gpu, processes, GPU["fp32_matmul"] * GPU["efficiency"], GPU["bf16_matmul"] * GPU["efficiency"], GPU["link_bytes_per_s"])
            rows.append({"model": name, "gpus": processes, **p})
            print(f"{name:<13}{processes:>5}{p['solves_s'] / 60:>9.1f}{p['passes_s'] / 60:>9.1f}{p['communication_s'] / 60:>8.1f}{p['total_s'] / 60:>9.1f}")
    result = {"cpu_matmul_gflop_per_s": rate / 1e9, "cpu_solves": {f"{c}x{b}": t for (c, b), t in cpu.items()}, "k_cpu": k_cpu,
              "cpu_fit_errors": cpu_errors, "gpu_solves_source": source, "gpu_solves": {f"{c}x{b}": t for (c, b), t in gpu_solves.items()},
              "k_gpu": k_gpu, "gpu_fit_errors": gpu_errors, "gpu_assumptions": GPU, "tokens": TOKENS, "projection": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_projection.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
