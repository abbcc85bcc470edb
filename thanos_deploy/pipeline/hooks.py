"""The hooks that collect the calibration statistics (methods/stats.py) of every linear of a
decoder layer in one pass.

Linears that read the same input tensor (q/k/v, gate/up, OPT's q/k/v) share one accumulator: the
hooks recognise the shared tensor at run time, so no model family needs a hand-written list.

The layer's output is never used, so a statistics pass stops as soon as every hooked linear has its
input (`AllInputsSeen`): the last linear (down_proj) and what follows it are never computed, and the
statistics are bit-identical to a whole pass's. (Multiplying out only the upper panels of the
symmetric XᵀX saves a third of its time but changes H by rounding, which moves Thanos's masks and
perplexity by percents: docs/speed.md.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods.stats import Stats


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
