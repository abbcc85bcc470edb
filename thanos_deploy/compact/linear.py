"""CompactLinear: a pruned linear layer that stores and computes only what is left.

    y = W x + b,  W [out, in], stored as
      weight        [out - d, k]  the rows that hold the pattern, over the kept input columns
      in_index      [k]           which input columns are kept (absent: all of them)
      dense_rows    [d]           the outlier rows kept dense (absent: none)
      dense_weight  [d, in]       their full weights
      bias          [out]

Forward: gather the kept columns, one matmul for the pattern rows, one dense matmul for the
outlier rows, outputs put back in the original row order. A structured-pruned linear has
k < in; a packed N:M linear has k = in and a `weight` that is dense-with-zeros on CPU or a
semi-structured sparse tensor on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CompactLinear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,
        *,
        in_features: int,
        in_index: torch.Tensor | None = None,
        dense_rows: torch.Tensor | None = None,
        dense_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        packed: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.packed = packed  # (n, m) when the pattern rows are stored packed N:M
        if dense_rows is not None and len(dense_rows) == 0:
            dense_rows = dense_weight = None
        self.in_features = in_features
        self.out_features = weight.shape[0] + (0 if dense_rows is None else len(dense_rows))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("in_index", in_index)
        self.register_buffer("dense_rows", dense_rows)
        self.dense_weight = None if dense_weight is None else nn.Parameter(dense_weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("order", None, persistent=False)
        self._update_order()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._update_order())

    def _update_order(self) -> None:
        """The permutation that puts [pattern rows, dense rows] back in the original row order."""
        if self.dense_rows is not None:
            main_rows = _complement(self.dense_rows, self.out_features)
            self.order = torch.argsort(torch.cat([main_rows, self.dense_rows]))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, in_index=None, dense_rows=None, packed=None) -> "CompactLinear":
        """Split a dense(-with-zeros) weight [out, in] into pattern rows over `in_index` and dense rows."""
        if dense_rows is not None and len(dense_rows) == 0:
            dense_rows = None
        main = weight if dense_rows is None else weight[_complement(dense_rows, weight.shape[0])]
        if in_index is not None:
            main = main[:, in_index]
        dense = None if dense_rows is None else weight[dense_rows].clone()
        return cls(
            main.contiguous().clone(),
            in_features=weight.shape[1],
            in_index=in_index,
            dense_rows=dense_rows,
            dense_weight=dense,
            bias=None if bias is None else bias.detach().clone(),
            packed=packed,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = x if self.in_index is None else x.index_select(-1, self.in_index)
        y = F.linear(main, self.weight)
        if self.order is not None:
            y = torch.cat([y, F.linear(x, self.dense_weight)], dim=-1).index_select(-1, self.order)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """The equivalent dense weight [out, in] (zeros where pruned)."""
        weight = self.weight
        if type(weight.data) is not torch.Tensor:  # a semi-structured sparse tensor
            weight = weight.to_dense()
        main = torch.zeros(weight.shape[0], self.in_features, dtype=weight.dtype, device=weight.device)
        if self.in_index is None:
            main.copy_(weight)
        else:
            main[:, self.in_index] = weight
        if self.order is None:
            return main
        return torch.cat([main, self.dense_weight]).index_select(0, self.order)

    def extra_repr(self) -> str:
        kept = self.in_features if self.in_index is None else len(self.in_index)
        dense = 0 if self.dense_rows is None else len(self.dense_rows)
        return f"in_features={self.in_features}, out_features={self.out_features}, kept_inputs={kept}, dense_rows={dense}, bias={self.bias is not None}"


def _complement(index: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=index.device)
    keep[index] = False
    return torch.nonzero(keep).squeeze(1)
