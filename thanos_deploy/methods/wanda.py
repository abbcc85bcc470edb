"""Wanda (Sun et al., 2023): remove the weights with the smallest |W_ij|·‖X_j‖, row by row.

Each output row is its own comparison group (every row ends with the same sparsity); N:M selects
within every group of M; structured removes the columns with the smallest mean score. No update
of the remaining weights.
"""

import torch

from ..patterns import Pattern, mask_for
from .stats import Stats


def scores(weight: torch.Tensor, stats: Stats) -> torch.Tensor:
    """The Wanda metric |W_ij|·‖X_j‖₂ in float32 (Thanos selects with it too)."""
    return weight.abs().float() * stats.sq_norms.sqrt().unsqueeze(0)


def column_score(weight: torch.Tensor, stats: Stats) -> torch.Tensor:
    """Σ_r |W_rj|·‖X_j‖: the Wanda metric of a whole input column."""
    return scores(weight, stats).sum(0)


def prune(weight: torch.Tensor, stats: Stats, pattern: Pattern) -> torch.Tensor:
    mask = mask_for(pattern, scores(weight, stats), per_row=True)
    return weight.masked_fill(mask, 0)
