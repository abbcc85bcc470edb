"""Activation importance (Minitron, Muralidharan et al., 2024): rank whole units by how much they
fire on the calibration data, and remove the quietest, with no update of the remaining weights.

A unit's importance is the energy of its activations, Σ_j ‖X_j‖² over the consumer's input
columns that carry it: an MLP neuron's activation entering down_proj, a head's output entering
o_proj (Minitron aggregates by an L2 norm over the batch and a mean over the sequence; over all
calibration tokens at once this is the L2 norm over tokens, squared). The weights play no part, so
the method is defined for whole units only: width and structured patterns.
"""

import torch

from ..errors import UserError
from ..patterns import Columns, Pattern, Structured, Width, mask_for
from .stats import Stats


def column_score(weight: torch.Tensor, stats: Stats) -> torch.Tensor:
    """‖X_j‖²: the activation energy of input column j."""
    return stats.sq_norms.float()


def check(pattern: Pattern, options: dict) -> None:
    if not isinstance(pattern, (Width, Structured, Columns)):
        raise UserError(f"method 'activation' ranks whole units by their activations, so it cannot choose single weights for "
                        f"{pattern}: use it with --pattern width:... or structured:P")


def prune(weight: torch.Tensor, stats: Stats, pattern: Pattern) -> torch.Tensor:
    scores = column_score(weight, stats).unsqueeze(0).expand_as(weight)
    return weight.masked_fill(mask_for(pattern, scores, per_row=False), 0)
