"""Hessian preparation shared by SparseGPT and Thanos.

Notation: W is c x b, H = Σ x xᵀ is b x b, F_i = {i, ..., b-1} the trailing columns.

The key object is U, the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). For every i,

    (H_{F_i F_i})⁻¹ = U[i:, i:]ᵀ U[i:, i:]

so one factorisation gives the inverse of every trailing sub-Hessian: SparseGPT reads its rows,
Thanos its blocks. We compute U without forming H⁻¹: with R the upper factor of H = R Rᵀ (a Cholesky
of H with its index order reversed), H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹. One Cholesky and one triangular
inverse instead of SparseGPT's Cholesky, cholesky_inverse and second Cholesky.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import UserError
from ..patterns import NM, Pattern

RETRIES = 4


def column_score(weight: torch.Tensor, stats) -> torch.Tensor:
    """(Σ_r W_rj²)·‖X_j‖²: what removing column j alone costs, to a diagonal approximation of H."""
    return weight.float().square().sum(0) * stats.sq_norms.float()


def check_options(pattern: Pattern, options: dict) -> None:
    """Checks shared by the Hessian-based methods: positive sizes, N:M-aligned blocks, damping > 0."""
    for name in ("block_size", "row_batch"):
        if name in options and options[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {options[name]}")
    if isinstance(pattern, NM) and options["block_size"] % pattern.m:
        raise UserError(f"--block-size {options['block_size']} must be a multiple of M={pattern.m} for pattern {pattern}")
    if not options["percdamp"] > 0:
        raise UserError(f"--percdamp must be positive, got {options['percdamp']:g}")


def dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that never fire (H_jj = 0): set H_jj = 1 and zero W[:, j], as the reference code does.

    Returns copies (W, H) in float32, or float64 for float64 weights; the originals are untouched.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.to(dtype, copy=True)
    H = hessian.to(dtype, copy=True)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    return W, H


def inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U (upper) with (H + λI)⁻¹ = UᵀU, λ = percdamp·mean(diag H).

    If the factorisation fails or gives non-finite values, retry with the damping ×10, at most
    RETRIES times, with a warning each time.
    """
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp
    for attempt in range(RETRIES + 1):
        L, info = torch.linalg.cholesky_ex((H + damp * mean_diag * eye).flip(0, 1))
        if int(info) == 0:
            # H = R Rᵀ with R = flip(L) upper; U = R⁻¹ = flip(L⁻¹).
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                return U
        if attempt == RETRIES:
            break
        warnings.warn(f"Hessian factorisation failed with percdamp={damp:g}; retrying with percdamp={damp * 10:g}")
        damp *= 10
    raise UserError(
        f"the Hessian could not be factorised even with percdamp={damp:g}: use more calibration samples or a larger --percdamp"
    )


def trailing_inverse(U: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Rows and columns [start, stop) of (H_FF)⁻¹, F = [start, b); stop=None gives all of it.

    U is upper triangular, so only its rows start..stop-1 reach those columns: the block is
    U[start:stop, start:stop]ᵀ U[start:stop, start:stop].
    """
    block = U[start:stop, start:stop]
    return block.T @ block


def outlier_rows(W: torch.Tensor, sq_norms: torch.Tensor, alpha: float) -> torch.Tensor:
    """Boolean mask of the ⌊α·c⌋ rows with the largest Σ_j W_ij²‖X_j‖² (kept dense by Thanos)."""
    count = math.floor(alpha * W.shape[0] + 1e-9)
    mask = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    if count:
        score = (W.square() * sq_norms.unsqueeze(0)).sum(1)
        mask[torch.argsort(score, descending=True, stable=True)[:count]] = True
    return mask
