"""Where Thanos's per-block time goes on CUDA (a development probe, not a benchmark of record)."""
import time
import torch

dev = torch.device("cuda")
torch.manual_seed(0)


def t(fn, n=5):
    fn(); torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n * 1e3


B, v, s = 512, 256, 256
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
