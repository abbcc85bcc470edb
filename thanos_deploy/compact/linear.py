"""CompactLinear: a pruned linear layer that stores and computes only what is left.

y = W x + b with W [out, in] and d outlier rows kept dense, in one of two layouts:

shrunk (structured: the non-outlier rows are zero outside k kept input columns)
    weight        [out, k]       every row over the kept columns `in_index` [k]
    dense_weight  [d, in - k]    the outlier rows over the other columns `dense_index`
    forward: y = W[:, kept] x[kept]; y[dense_rows] += W[dense_rows, other] x[other]
    (one big matmul over the kept columns, one small one for what only the outlier rows read;
    with outlier rows, x is gathered once in the order [kept, other] and both matmuls read views)

packed (N:M: the non-outlier rows hold the pattern, the outlier rows do not)
    weight        [out - d, in]  the pattern rows: dense-with-zeros on CPU, a semi-structured
                                 sparse tensor on CUDA; stored packed on disk (packing.py)
    dense_weight  [d, in]        the outlier rows
    forward: both matmuls, outputs put back in the original row order

plus `dense_rows` [d] and `bias` [out]. Same flops either way: (out - d)·k + d·in.

The forward works on x flattened to 2-D: on CPU, index_select along the last axis of a 3-D tensor
takes a generic path 4–25× slower than along axis 1 of a 2-D one (measured, torch 2.13), which made
the outlier-row layout slower than the dense layer it replaces. ONNX Runtime has the same problem
with Gather on axis 1, so exported graphs gather rows of xᵀ (see `_gather_columns`). Everything
the forward indexes with is derived once, when the module is built or loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CompactLinear(nn.Module):
    stands_in_for_linear = True  # models.is_linear: its weights are a linear's, not an unsupported layer's

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        in_features: int,
        out_features: int,
        in_index: torch.Tensor | None = None,
        dense_rows: torch.Tensor | None = None,
        dense_weight: torch.Tensor | None = None,
        dense_index: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        packed: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.packed = packed  # (n, m) when the pattern rows are stored packed N:M
        if dense_rows is not None and len(dense_rows) == 0:
            dense_rows = dense_weight = dense_index = None
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("in_index", in_index)
        self.register_buffer("dense_rows", dense_rows)
        self.register_buffer("dense_index", dense_index)
        self.dense_weight = None if dense_weight is None else nn.Parameter(dense_weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.product = F.linear  # the runtime may swap in a threaded one (runtime/threaded.py)
        self.register_buffer("order", None, persistent=False)
        self.register_buffer("gather", None, persistent=False)
        self._derive_indices()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._derive_indices())

    def _derive_indices(self) -> None:
        """What the forward indexes with: packed, the permutation that puts [pattern rows, dense
        rows] back in row order; shrunk with outlier rows, the input order [kept, other]."""
        if self.dense_rows is not None and self.packed:
            main_rows = _complement(self.dense_rows, self.out_features)
            self.order = torch.argsort(torch.cat([main_rows, self.dense_rows]))
        elif self.dense_index is not None:
            self.gather = torch.cat([self.in_index, self.dense_index])
        else:
            self.gather = self.in_index

    @classmethod
    def shrunk(cls, weight: torch.Tensor, bias, *, in_index: torch.Tensor, dense_rows: torch.Tensor | None) -> "CompactLinear":
        """From a dense(-with-zeros) weight whose non-outlier rows are zero outside `in_index`."""
        other = _complement(in_index, weight.shape[1]) if dense_rows is not None and len(dense_rows) else None
        return cls(
            weight[:, in_index].contiguous(),
            in_features=weight.shape[1],
            out_features=weight.shape[0],
            in_index=in_index,
            dense_rows=dense_rows,
            dense_weight=None if other is None else weight[dense_rows][:, other].contiguous(),
            dense_index=other,
            bias=None if bias is None else bias.detach().clone(),
        )

    @classmethod
    def packed_rows(cls, weight: torch.Tensor, bias, *, dense_rows: torch.Tensor | None, pattern: tuple[int, int]) -> "CompactLinear":
        """From a dense(-with-zeros) weight whose rows but `dense_rows` hold the N:M pattern."""
        has_dense = dense_rows is not None and len(dense_rows) > 0
        main = weight[_complement(dense_rows, weight.shape[0])] if has_dense else weight
        return cls(
            main.contiguous().clone(),
            in_features=weight.shape[1],
            out_features=weight.shape[0],
            dense_rows=dense_rows if has_dense else None,
            dense_weight=weight[dense_rows].clone() if has_dense else None,
            bias=None if bias is None else bias.detach().clone(),
            packed=pattern,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.packed:  # bias added apart: the CUDA semi-structured weight takes a plain matmul
            y = self.product(x, self.weight)
            if self.order is not None:
                y = _gather_columns(torch.cat([y, self.product(x, self.dense_weight)], dim=1), self.order, self.out_features)[0]
            if self.bias is not None:
                y = y + self.bias
        else:
            kept, other = _gather_columns(x, self.gather, self.weight.shape[1])
            y = self.product(kept, self.weight, self.bias)
            if self.dense_index is not None:
                y = _add_columns(y, self.dense_rows, self.product(other, self.dense_weight))
        return y.view(*lead, y.shape[-1])

    def dense(self) -> torch.Tensor:
        """The equivalent dense weight [out, in] (zeros where pruned)."""
        weight = self.weight
        if type(weight.data) is not torch.Tensor:  # a semi-structured sparse tensor
            weight = weight.to_dense()
        if self.packed:
            if self.order is None:
                return weight.detach().clone()
            return torch.cat([weight, self.dense_weight]).index_select(0, self.order)
        full = torch.zeros(self.out_features, self.in_features, dtype=weight.dtype, device=weight.device)
        full[:, self.in_index] = weight
        if self.dense_index is not None:
            full[self.dense_rows.unsqueeze(1), self.dense_index] = self.dense_weight
        return full

    def extra_repr(self) -> str:
        kept = self.in_features if self.in_index is None else len(self.in_index)
        dense = 0 if self.dense_rows is None else len(self.dense_rows)
        kind = f"packed {self.packed[0]}:{self.packed[1]}" if self.packed else "shrunk"
        return f"{kind}, in_features={self.in_features}, out_features={self.out_features}, kept_inputs={kept}, dense_rows={dense}, bias={self.bias is not None}"


def _gather_columns(x: torch.Tensor, index: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[:, index] as two column blocks, [:split] and [split:] (views).

    ONNX Runtime gathers along axis 1 an element at a time (slower than the matmul it feeds), so
    an exported graph gathers whole rows of xᵀ instead: Transpose, Gather on axis 0, Transpose.
    """
    if torch.onnx.is_in_onnx_export():
        rows = x.t().index_select(0, index)
        return rows[:split].t(), rows[split:].t()
    cols = x.index_select(1, index)
    return cols[:, :split], cols[:, split:]


def _add_columns(y: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """y[:, index] += values. Exported as ScatterElements on axis 1; index_add_ would export as a
    ScatterND between three full transposes of y."""
    if torch.onnx.is_in_onnx_export():
        return y.scatter_add(1, index.expand(values.shape[0], -1), values)
    return y.index_add_(1, index, values)


def _complement(index: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=index.device)
    keep[index] = False
    return torch.nonzero(keep).squeeze(1)
