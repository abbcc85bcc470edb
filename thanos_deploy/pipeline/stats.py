"""Calibration statistics of a linear layer's inputs, and the hooks that collect them.

For inputs X (tokens x in) we keep, in float32 whatever the model's dtype:
- `hessian`  H = Σ_t x_t x_tᵀ, the (unscaled) Hessian of the layer-wise loss ‖(W'-W)X‖², only
             for methods that need it (it costs as much as a forward pass);
- `sq_norms` ‖X_j‖² = Σ_t x_tj², the per-input-column squared norms of the Wanda score;
- `sample`   without H, every k-th token, so the reconstruction error can still be reported.
Sums, not means: every method is invariant to the scale (damping is relative to mean(diag H)).

Linears that read the same input tensor (q/k/v, gate/up, OPT's q/k/v) share one accumulator: the
hooks recognise the shared tensor at run time, so no model family needs a hand-written list.

The layer's output is never used, so a statistics pass stops as soon as every hooked linear has its
input (`AllInputsSeen`): the last linear (down_proj) and what follows it are never computed, and the
statistics are bit-identical to a whole pass's. (Multiplying out only the upper panels of the
symmetric XᵀX saves a third of its time but changes H by rounding, which moves Thanos's masks and
perplexity by percents: docs/speed.md.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


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


class AllInputsSeen(Exception):
    """Raised by the last hook of a pass: the rest of the layer's forward is not needed."""


class InputStats:
    """Forward pre-hooks on `linears` that accumulate their input statistics.

    Call `next_batch()` before every forward pass: within one pass, linears whose input is the
    very same tensor are grouped and accumulated once. Tensors seen in the current pass are kept
    referenced so their memory cannot be reused by a different tensor during the pass. Once every
    hooked linear has had its input in a pass, the hook raises AllInputsSeen (`feed` catches it);
    a linear a pass does not reach (an MoE expert no token chose) just lets the pass run to its end.
    """

    def __init__(self, linears: dict[str, nn.Linear], *, hessian: bool, sample_every: int = 1):
        self.hessian = hessian
        self.sample_every = sample_every
        self.owner: dict[str, str] = {}  # linear name -> name of the linear whose stats it shares
        self.stats: dict[str, Stats] = {}
        self._this_pass: dict[tuple, tuple[torch.Tensor, str]] = {}
        self._fed: set[str] = set()  # linears that had their input in this pass
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if name not in self.owner:
                seen = self._this_pass.get(key)
                self.owner[name] = seen[1] if seen else name
                if not seen:
                    self.stats[name] = Stats.empty(
                        x.shape[-1], hessian=self.hessian, device=x.device, sample_every=self.sample_every
                    )
            self._this_pass.setdefault(key, (x, name))
            if self.owner[name] == name:
                self.stats[name].add(x)
            self._fed.add(name)
            if len(self._fed) == len(self._handles):
                raise AllInputsSeen

        return hook

    def next_batch(self) -> None:
        self._this_pass.clear()
        self._fed.clear()

    def feed(self, layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """One statistics pass of `layer` over one batch, stopped once every hooked linear has its input."""
        self.next_batch()
        try:
            layer(hidden, *args, **kwargs)
        except AllInputsSeen:
            pass

    def __getitem__(self, name: str) -> Stats:
        return self.stats[self.owner[name]]

    def groups(self) -> list[list[str]]:
        """Names of the linears that share each accumulator, in hook order."""
        out: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            out.setdefault(owner, []).append(name)
        return list(out.values())

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self.next_batch()
