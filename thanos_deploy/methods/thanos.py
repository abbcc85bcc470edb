"""Thanos (Ilin & Richtárik, 2025): block-wise pruning with the exact multi-weight OBS update.

Per block of B columns [i1, i2), with F = [i1, b) the columns still free to move:
1. pick the mask M on the block with the Wanda score |W_ij|·‖X_j‖ of the current weights
   (unstructured: the still-missing zeros are the smallest scores over all of W[:, F], and only the
   ones inside the block are taken now; N:M: the N smallest of every group of M);
2. for each row r with pruned set q = M_r, remove all of q at once, exactly:
       solve  (H_FF⁻¹)[q, q] λ = W[r, q],    then   W[r, F] -= λᵀ (H_FF⁻¹)[q, F]
   which minimises ‖ΔW_r X_F‖² subject to W_r[q] = 0 (earlier columns are frozen).

No inverse is recomputed per block. With U the Cholesky factor of H⁻¹ (hessian.py),
(H_FF⁻¹)[block, F] = U[block, block]ᵀ U[block, F], so with Λ the λ's scattered into block
positions (c x B), the update of all rows is E = Λ U[block, block]ᵀ, W[:, F] -= E U[block, F]:
two matmuls, like SparseGPT's lazy update. What remains per row is one small SPD system of size
min(|q_r|, B - |q_r|) (Cholesky-solved in batches of `row_batch` rows; rows are sorted by size
so a batch pads little).

Structured: the s columns with the smallest (Σ_r W_rj²)·‖X_j‖² are removed from every non-outlier
row at once: W -= W[:, Q] (H⁻¹_QQ)⁻¹ H⁻¹_{Q,:}, one shared s x s system. Columns (the consumer of
the units a width pattern removes): the same update on the given Q, every row.

Outlier rows (`alpha`, N:M and structured): the ⌊α·c⌋ rows with the largest Σ_j W_ij²‖X_j‖² are
left dense; every other row holds the pattern exactly.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import UserError
from ..patterns import NM, Columns, Pattern, Structured, Unstructured, Width, n_of_m, smallest
from .hessian import (  # noqa: F401
    check_options,
    column_score,
    dead_columns,
    inverse_cholesky,
    outlier_rows,
    trailing_inverse,
)
from .stats import Stats


def pattern_defaults(pattern: Pattern) -> dict:
    """α = 0.1 for structured (a tenth of the rows kept dense), 0 for everything else."""
    return {"alpha": 0.1} if isinstance(pattern, Structured) else {}


def check(pattern: Pattern, options: dict) -> None:
    """Range checks of the options, and α only where outlier rows have a place."""
    alpha = options["alpha"]
    if alpha > 0 and isinstance(pattern, (Width, Columns)):
        raise UserError("--alpha keeps dense outlier rows, which a plain architecture has no place for: use --alpha 0 with width patterns")
    if not 0.0 <= alpha <= 0.5:
        raise UserError(f"--alpha must be in [0, 0.5], got {alpha:g}")
    if alpha > 0 and isinstance(pattern, Unstructured):
        raise UserError("--alpha (dense outlier rows) applies to N:M and structured patterns only; use --alpha 0 with unstructured")
    check_options(pattern, options)


def structured_columns(pattern: Structured, cols: int, alpha: float) -> int:
    """s = ⌈P·b/(1-α)⌉, capped below b: the overall zero fraction stays about P with dense rows."""
    return min(math.ceil(pattern.sparsity * cols / (1 - alpha) - 1e-9), cols - 1)


def prune(
    weight: torch.Tensor,
    stats: Stats,
    pattern: Pattern,
    *,
    block_size: int = 512,
    row_batch: int = 256,
    percdamp: float = 0.01,
    alpha: float = 0.0,
) -> torch.Tensor:
    W, H = dead_columns(weight, stats.hessian)
    sq_norms = stats.sq_norms.to(W.dtype)
    dense = outlier_rows(W, sq_norms, alpha)
    U = inverse_cholesky(H, percdamp)
    active = W[~dense]
    if isinstance(pattern, Columns):
        active = _remove_columns(active, U, torch.tensor(pattern.index, dtype=torch.long, device=W.device))
    elif isinstance(pattern, Structured):
        active = _structured(active, U, sq_norms, structured_columns(pattern, W.shape[1], alpha))
    else:
        active = _blockwise(active, U, sq_norms.sqrt(), pattern, block_size, row_batch)
    W[~dense] = active
    return W.to(weight.dtype)


def _blockwise(W: torch.Tensor, U: torch.Tensor, norms: torch.Tensor, pattern: Pattern, block_size: int, row_batch: int) -> torch.Tensor:
    rows, cols = W.shape
    missing = pattern.zeros(rows, cols) if isinstance(pattern, Unstructured) else 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if isinstance(pattern, NM):
            mask = n_of_m(W[:, i1:i2].abs() * norms[i1:i2], pattern.n, pattern.m)
        else:
            mask = smallest(W[:, i1:].abs() * norms[i1:], missing)[:, : i2 - i1].contiguous()
            missing -= int(mask.sum())
        E = _block_update(U, i1, i2, W[:, i1:i2], mask, row_batch)
        W[:, i1:] -= E @ U[i1:i2, i1:]
        W[:, i1:i2].masked_fill_(mask, 0.0)
    return W


def _block_update(U: torch.Tensor, i1: int, i2: int, Wb: torch.Tensor, mask: torch.Tensor, row_batch: int) -> torch.Tensor:
    """E (rows x B) such that W[:, F] -= E U[block, F] removes every row's pruned set exactly.

    A row pruning q (kept k) solves either |q| unknowns on G = H_FF⁻¹[block, block] = UbᵀUb,
    λ = G_qq⁻¹ w_q and E = λ Ubᵀ; or, when it prunes more than half of the block, |k| unknowns on
    S = G⁻¹ (the block's Schur complement of H): with Δ_q = -w_q the kept part is
    Δ_k = S_kk⁻¹ S_kq w_q, and E = -Δ Ub⁻¹. Same solution, smaller system.
    """
    width = Wb.shape[1]
    Ub = U[i1:i2, i1:i2]
    E = torch.zeros_like(Wb)
    counts = mask.sum(1)
    by_q = torch.nonzero((counts > 0) & (counts <= width // 2)).squeeze(1)
    by_k = torch.nonzero(counts > width // 2).squeeze(1)
    if len(by_q):
        E[by_q] = _principal_solve(trailing_inverse(U, i1, i2), Wb[by_q], mask[by_q], row_batch) @ Ub.T
    if len(by_k):
        Ub_inv = torch.linalg.solve_triangular(Ub, torch.eye(width, dtype=Ub.dtype, device=Ub.device), upper=True)
        S = Ub_inv @ Ub_inv.T
        pruned = Wb[by_k] * mask[by_k]
        kept = _principal_solve(S, pruned @ S, ~mask[by_k], row_batch)
        E[by_k] = (pruned - kept) @ Ub_inv
    return E


def _principal_solve(M: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor, row_batch: int) -> torch.Tensor:
    """X (rows x B): for each row r, x solving M[i, i] x = rhs[r, i] with i = mask[r], scattered to i.

    Rows are taken in order of |i| so each batch pads to a similar size (N:M needs no padding);
    padded entries get an identity row/column and a zero right-hand side, so their x is 0.
    On CPU a batch is also capped to CACHE_FLOATS entries of systems (one batch of 256 systems of
    256² floats is 64 MB: the factorisation then runs at memory speed), and batches of systems of at
    least CONCURRENT_FROM unknowns run on all threads at once, one thread each: LAPACK's small
    factorisations do not scale across threads.
    """
    out = torch.zeros_like(rhs)
    counts = mask.sum(1)
    order = torch.argsort(counts, stable=True)
    order = order[counts[order] > 0]
    chunks = []
    for group in order.split(row_batch):
        per_chunk = len(group) if rhs.is_cuda else max(1, CACHE_FLOATS // int(counts[group[-1]]) ** 2)
        chunks += group.split(per_chunk)
    concurrent = not rhs.is_cuda and len(order) > 0 and int(counts[order[-1]]) >= CONCURRENT_FROM
    solved = _map_batches(lambda rows: _solve_batch(M, rhs[rows], mask[rows], int(counts[rows[-1]])), chunks, concurrent)
    for rows, x in zip(chunks, solved):
        out[rows] = x
    return out


CACHE_FLOATS = 1 << 20  # 4 MB of float32 systems per batch on CPU: fits a core's share of cache
CONCURRENT_FROM = 64  # smaller systems ran slower with threads (bench: B = 32 and 64, 0.34 vs 0.55 s)


def _solve_batch(M: torch.Tensor, rhs: torch.Tensor, m: torch.Tensor, s: int) -> torch.Tensor:
    """Principal-submatrix solves for one batch of rows whose masks select at most s columns."""
    width = rhs.shape[1]
    cols = torch.arange(width, device=rhs.device)
    idx = torch.sort(torch.where(m, cols, cols + width), dim=1).values[:, :s] % width  # selected columns first
    valid = m.gather(1, idx)
    # M[idx, idx] as two gathers, whole rows then columns within them: 4x faster than one 2-D index
    A = M.index_select(0, idx.reshape(-1)).view(len(m), s, width).gather(2, idx.unsqueeze(1).expand(-1, s, -1))
    if not bool(valid.all()):
        A.masked_fill_(~(valid.unsqueeze(2) & valid.unsqueeze(1)), 0.0)
        A.diagonal(dim1=1, dim2=2).masked_fill_(~valid, 1.0)
    b = (rhs.gather(1, idx) * valid).unsqueeze(2)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):  # not expected for an SPD principal submatrix; be safe
        x = torch.linalg.solve(A, b)
    else:
        x = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, b, upper=False), upper=True)
    return torch.zeros_like(rhs).scatter_(1, idx, x.squeeze(2) * valid)


def _map_batches(solve, batches: list, concurrent: bool) -> list:
    """[solve(b) for b in batches]; if `concurrent`, on every CPU thread at once, each op single-threaded."""
    threads = torch.get_num_threads()
    if not concurrent or threads == 1 or len(batches) == 1:
        return [solve(b) for b in batches]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(solve, batches))
    finally:
        torch.set_num_threads(threads)


def _structured(W: torch.Tensor, U: torch.Tensor, sq_norms: torch.Tensor, s: int) -> torch.Tensor:
    if s <= 0 or W.shape[0] == 0:
        return W
    score = W.square().sum(0) * sq_norms
    return _remove_columns(W, U, torch.nonzero(smallest(score, s)).squeeze(1))


def _remove_columns(W: torch.Tensor, U: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """W without the columns Q, the rest moved to minimise ‖ΔW X‖²: W -= W[:, Q] (H⁻¹_QQ)⁻¹ H⁻¹_{Q,:}."""
    if len(Q) == 0 or W.shape[0] == 0:
        return W
    Hinv_Q = U[:, Q].T @ U  # rows Q of H⁻¹ = UᵀU
    L = torch.linalg.cholesky(Hinv_Q[:, Q])
    W = W - W[:, Q] @ torch.cholesky_solve(Hinv_Q, L)
    W[:, Q] = 0.0
    return W
