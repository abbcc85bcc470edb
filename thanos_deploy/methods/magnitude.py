"""Magnitude pruning: remove the weights with the smallest |W|.

Unstructured uses one threshold over the whole matrix (as the Wanda and SparseGPT repos'
magnitude baselines do); N:M the smallest |W| of every group; structured the columns with the
smallest mean |W|. No calibration data is used.
"""

import torch

from ..patterns import Pattern, mask_for
from .stats import Stats


def column_score(weight: torch.Tensor, stats: Stats) -> torch.Tensor:
    """Σ_r |W_rj|: the magnitude of a whole input column."""
    return weight.abs().float().sum(0)


def prune(weight: torch.Tensor, stats: Stats, pattern: Pattern) -> torch.Tensor:
    mask = mask_for(pattern, weight.abs().float(), per_row=False)
    return weight.masked_fill(mask, 0)
