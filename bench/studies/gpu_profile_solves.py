"""Where Thanos's per-block time goes on CUDA (a development probe, not a benchmark of record).

    python bench/studies/gpu_profile_solves.py      # needs an NVIDIA GPU; prints milliseconds per kernel

Times the pieces of one block's solve (gather, Cholesky, triangular solves, alternatives) on a
random well-conditioned Gram matrix, and the selection kernels on a LLaMA-7B-sized MLP weight.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def t(fn, n=5):
    """Milliseconds per call of `fn` on CUDA, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=512, help="columns per block (B)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this probe needs an NVIDIA GPU with CUDA; none is visible here")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, v, s = args.block, 256, args.block // 2
    V = torch.randn(B, B, device=dev)
    G = V @ V.T / B + torch.eye(B, device=dev)
    idx = torch.stack([torch.randperm(B, device=dev)[:s].sort().values for _ in range(v)])
    A = G[idx.unsqueeze(2), idx.unsqueeze(1)]
    b = torch.randn(v, s, 1, device=dev)
    L = torch.linalg.cholesky(A)
    print(f"gather {t(lambda: G[idx.unsqueeze(2), idx.unsqueeze(1)]):.3f} ms")
    print(f"cholesky_ex {t(lambda: torch.linalg.cholesky_ex(A)):.3f} ms")
    print(f"2x solve_triangular {t(lambda: torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, b, upper=False), upper=True)):.3f} ms")
    print(f"cholesky_solve {t(lambda: torch.cholesky_solve(b, L)):.3f} ms")
    print(f"linalg.solve (LU) {t(lambda: torch.linalg.solve(A, b)):.3f} ms")
    for big in (1024, 4096):
        idx2 = idx.repeat(big // v, 1)
        A2 = G[idx2.unsqueeze(2), idx2.unsqueeze(1)]
        print(f"cholesky_ex batch {big}: {t(lambda: torch.linalg.cholesky_ex(A2)):.3f} ms")
    x = torch.rand(11008 * 4096, device=dev)
    k = x.numel() // 2
    print(f"kthvalue 45M: {t(lambda: x.kthvalue(k), 2):.3f} ms")
    print(f"sort 45M: {t(lambda: x.sort(), 2):.3f} ms")
    print(f"topk 45M k/2: {t(lambda: x.topk(k, largest=False), 2):.3f} ms")
    print(f"cholesky_inverse + bmm {t(lambda: torch.cholesky_inverse(L) @ b):.3f} ms")
    print(f"inv_ex + bmm {t(lambda: torch.linalg.inv_ex(A)[0] @ b):.3f} ms")
    Linv = torch.linalg.inv_ex(L)[0]
    print(f"tri-inverse via solve_triangular(L, I) {t(lambda: torch.linalg.solve_triangular(L, torch.eye(s, device=dev).expand(v, s, s), upper=False)):.3f} ms")
    print(f"2 bmv with Linv {t(lambda: Linv.mT @ (Linv @ b)):.3f} ms")
    A64 = A.double()
    print(f"cholesky_ex fp64 {t(lambda: torch.linalg.cholesky_ex(A64)):.3f} ms")


if __name__ == "__main__":
    main()
