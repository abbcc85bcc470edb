"""Numerical guards of the layer loop: a non-finite value is an error naming the layer, raised
before anything of that layer is written; a rank-deficient Hessian is a warning naming it."""

from __future__ import annotations

import warnings

import torch

from ..errors import UserError


def check_statistics(stats, where: str) -> None:
    """The calibration inputs of one linear must be finite (fp16 activations can overflow)."""
    for tensor in (stats.sq_norms, stats.hessian):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{where}: the calibration inputs contain inf or NaN (the model overflows in its dtype, or its weights "
                "are damaged); nothing was written: load it with --dtype float32, or check the model"
            )


def warn_rank_deficient(stats, in_features: int) -> None:
    """H = Σxxᵀ over fewer tokens than inputs is singular: only damping keeps the solve defined."""
    if stats.hessian is not None and stats.tokens < in_features:
        warnings.warn(
            f"rank-deficient Hessian: {stats.tokens} calibration tokens for {in_features} inputs; "
            "add calibration data (--nsamples, --seqlen) for a meaningful update"
        )


def check_weight(weight: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(weight).all()):
        raise UserError(f"{where}: pruning produced inf or NaN weights; nothing was written: raise --percdamp (e.g. 0.1) or use --dtype float32")


def check_output(output: torch.Tensor, where: str) -> None:
    """One calibration batch out of a pruned layer, checked before it is kept (in memory or on disk)."""
    if not bool(torch.isfinite(output).all()):
        raise UserError(f"{where}: the pruned layer's outputs contain inf or NaN; nothing was written: use --dtype float32 or raise --percdamp")
