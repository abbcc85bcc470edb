"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning one column at a time, with lazy block updates.

With U the upper Cholesky factor of H⁻¹ (see hessian.py), removing column i's pruned entries and
compensating on the later columns is err = (w_i - q_i)/U_ii, W[:, i:] -= err ⊗ U[i, i:]. Inside
a block of `block_size` columns this runs column by column; the rest of the matrix gets one matmul
per block (W[:, i2:] -= Err · U[block, i2:]).

Masks, as in the official code:
- unstructured: per block, the entries with W²/U_ii² at most the ⌊P·c·Bs⌋-th smallest (ties included);
- N:M: every M columns, the N smallest W²/U_ii² of the *current* (already updated) weights;
- structured: per block, the ⌈P·Bs⌉ columns with the smallest mean W²/U_ii² (the column baseline
  of the Thanos repository);
- columns (the consumer of the units a width pattern removes): exactly those, each compensated on
  the columns to its right, SparseGPT's order.
"""

from __future__ import annotations

import math

import torch

from ..patterns import NM, Columns, Pattern, Structured, column_mask, n_of_m, smallest
from .hessian import check_options as check  # noqa: F401  (the registry calls sparsegpt.check)
from .hessian import column_score, dead_columns, inverse_cholesky  # noqa: F401  (the registry reads sparsegpt.column_score)
from .stats import Stats


def prune(weight: torch.Tensor, stats: Stats, pattern: Pattern, *, block_size: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    W, H = dead_columns(weight, stats.hessian)
    U = inverse_cholesky(H, percdamp)
    rows, cols = W.shape
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        saliency = W1.square() / d.square()
        if isinstance(pattern, Columns):
            mask1 = column_mask(pattern, rows, cols, W.device)[:, i1:i2]
        elif isinstance(pattern, NM):
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        elif isinstance(pattern, Structured):
            drop = smallest(saliency.mean(0), math.ceil(pattern.sparsity * (i2 - i1) - 1e-9))
            mask1 = drop.unsqueeze(0).expand_as(W1)
        else:
            k = math.floor(saliency.numel() * pattern.sparsity)
            threshold = saliency.reshape(-1).kthvalue(k + 1).values if k < saliency.numel() else saliency.max()
            mask1 = saliency <= threshold if k > 0 else torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if isinstance(pattern, NM) and i % pattern.m == 0:
                window = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                mask1[:, i : i + pattern.m] = n_of_m(window, pattern.n, pattern.m)
            w = W1[:, i]
            err = torch.where(mask1[:, i], w, torch.zeros_like(w)) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = torch.where(mask1[:, i], torch.zeros_like(w), W1[:, i])
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W.to(weight.dtype)
