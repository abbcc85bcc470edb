"""Calibration statistics of a linear layer's inputs: what every method's `prune` reads.

For inputs X (tokens x in) we keep, in float32 whatever the model's dtype:
- `hessian`  H = Σ_t x_t x_tᵀ, the (unscaled) Hessian of the layer-wise loss ‖(W'-W)X‖², only
             for methods that need it (it costs as much as a forward pass);
- `sq_norms` ‖X_j‖² = Σ_t x_tj², the per-input-column squared norms of the Wanda score;
- `sample`   without H, every k-th token, so the reconstruction error can still be reported.
Sums, not means: every method is invariant to the scale (damping is relative to mean(diag H)).
The hooks that collect them over a decoder layer are in pipeline/hooks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Stats:
    sq_norms: torch.Tensor
    hessian: torch.Tensor | None
    tokens: int = 0
    sample_every: int = 0  # without H: keep every k-th token for the error report
    sample: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, in_features: int, *, hessian: bool, device, sample_every: int = 1) -> "Stats":
        h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        return cls(torch.zeros(in_features, dtype=torch.float32, device=device), h, sample_every=0 if hessian else sample_every)

    @classmethod
    def from_inputs(cls, inputs: torch.Tensor, *, hessian: bool = True) -> "Stats":
        stats = cls.empty(inputs.shape[-1], hessian=hessian, device=inputs.device)
        stats.add(inputs)
        return stats

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
            self.sq_norms.copy_(self.hessian.diagonal())
        else:
            self.sq_norms.add_(x.square().sum(0))
            self.sample.append(x[:: self.sample_every].clone())

    def relative_error(self, old: torch.Tensor, new: torch.Tensor) -> float:
        """‖(W'-W)X‖_F / ‖WX‖_F: exact from H, else on the token sample."""
        old = old.float()
        delta = new.float() - old
        if self.hessian is not None:
            num, den = (delta @ self.hessian * delta).sum(), (old @ self.hessian * old).sum()
        else:
            x = torch.cat(self.sample)
            num, den = (x @ delta.T).square().sum(), (x @ old.T).square().sum()
        return float(torch.sqrt(num.clamp_min(0) / den)) if den > 0 else 0.0

    @property
    def error_tokens(self) -> int:
        return self.tokens if self.hessian is not None else sum(len(x) for x in self.sample)
