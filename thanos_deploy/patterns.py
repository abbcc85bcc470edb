"""Sparsity patterns and the mask selections every method shares.

A weight is `[out, in]` (rows, columns). All patterns act along the input dimension, which is the
GEMM reduction axis K: that is where 2:4 sparse tensor cores and TensorRT expect the groups.

- `unstructured:P`  a fraction P of the weights are zero, anywhere.
- `N:M`             in every group of M consecutive weights of a row, N are zero (2:4, 4:8, 1:4...).
- `structured:P`    a fraction P of the input columns are zero in every (non-outlier) row, so they
                    can be removed physically.
- `width:...`       whole units removed in every decoder layer alike (MLP neurons, query heads inside
                    each KV group, whole KV groups), so the model keeps a standard config (width.py):
                    `width:mlp=0.3,heads=0.33` (fractions) or `width:intermediate_size=1024,
                    num_attention_heads=6,num_key_value_heads=1` (targets).
- `Columns`         not written by users: exactly these input columns of one weight are removed (the
                    consumer of the units a width pattern removes).

Mask helpers return boolean masks where True means "prune". Ties are broken by position (lowest
flat index first) so that a mask is the same on every device and every run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class Unstructured:
    sparsity: float

    def __str__(self) -> str:
        return f"unstructured:{self.sparsity:g}"

    def zeros(self, rows: int, cols: int) -> int:
        """Exact number of weights to remove from a rows x cols matrix."""
        return math.floor(self.sparsity * rows * cols + 1e-9)


@dataclass(frozen=True)
class NM:
    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return self.n / self.m


@dataclass(frozen=True)
class Structured:
    sparsity: float

    def __str__(self) -> str:
        return f"structured:{self.sparsity:g}"

    def columns(self, cols: int) -> int:
        """Number of input columns to remove (no outlier rows)."""
        return math.floor(self.sparsity * cols + 1e-9)


WIDTH_FRACTIONS = {"mlp": "intermediate_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}
MLP_MULTIPLE = 64  # llama.cpp's fast CPU path wants inner sizes in multiples of 16, q8_0 of 32, tensor cores 8 to 64; k-quants 256


@dataclass(frozen=True)
class Width:
    """Per config field (intermediate_size, num_attention_heads, num_key_value_heads): a fraction of
    the units to remove, or the count to keep; a fraction of the MLP leaves a multiple of `multiple`
    neurons (the widths engines run fast). Resolved against a model by width.plan."""

    fractions: tuple[tuple[str, float], ...] = ()
    targets: tuple[tuple[str, int], ...] = ()
    multiple: int = MLP_MULTIPLE

    def __str__(self) -> str:
        short = {v: k for k, v in WIDTH_FRACTIONS.items()}
        parts = [f"{short[k]}={v:g}" for k, v in self.fractions] + [f"{k}={v}" for k, v in self.targets]
        return "width:" + ",".join(parts + ([f"multiple={self.multiple}"] if self.multiple != MLP_MULTIPLE else []))


@dataclass(frozen=True)
class Columns:
    """Exactly these input columns are removed from every row (sorted indices)."""

    index: tuple[int, ...]

    def __str__(self) -> str:
        return f"columns:{len(self.index)}"


Pattern = Unstructured | NM | Structured | Width | Columns

_HELP = "use unstructured:P (0<=P<1), N:M (0<N<M, e.g. 2:4), structured:P (0<=P<1) or width:mlp=F,heads=F (see --help)"
_WIDTH_HELP = ("write width:KEY=VALUE[,KEY=VALUE]: fractions removed as mlp=, heads=, kv_heads= (0 <= F < 1), or counts kept "
               "as intermediate_size=, num_attention_heads=, num_key_value_heads=; multiple=N rounds the MLP a fraction leaves (default 64)")


def _parse_width(text: str, body: str) -> Width:
    fractions, targets, multiple = {}, {}, MLP_MULTIPLE
    for pair in (p.strip() for p in body.split(",")):
        key, sep, value = (s.strip() for s in pair.partition("="))
        if not sep or not key or not value:
            raise UserError(f"invalid pattern '{text}': '{pair}' is not KEY=VALUE; {_WIDTH_HELP}")
        field = WIDTH_FRACTIONS.get(key, key)
        if field in fractions or field in targets:
            raise UserError(f"invalid pattern '{text}': {field} is given twice; give each width once")
        if key in WIDTH_FRACTIONS:
            try:
                fraction = float(value)
            except ValueError:
                raise UserError(f"invalid pattern '{text}': {key}={value} is not a number; {_WIDTH_HELP}") from None
            if not 0.0 <= fraction < 1.0:
                raise UserError(f"invalid pattern '{text}': {key}={value} must be a fraction in [0, 1) of the units to remove")
            fractions[field] = fraction
        elif key in WIDTH_FRACTIONS.values():
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"invalid pattern '{text}': {key}={value} must be a whole number of units to keep, at least 1")
            targets[field] = int(value)
        elif key == "multiple":
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"invalid pattern '{text}': multiple={value} must be a whole number of neurons, at least 1 (e.g. 64, or 256 for k-quants)")
            multiple = int(value)
        else:
            raise UserError(f"invalid pattern '{text}': unknown key '{key}'; {_WIDTH_HELP}")
    return Width(tuple(sorted(fractions.items())), tuple(sorted(targets.items())), multiple)


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse '2:4', 'unstructured:0.5' or 'structured:0.3' into a pattern object."""
    if isinstance(text, (Unstructured, NM, Structured, Width, Columns)):
        return text
    spec = str(text).strip().lower()
    if spec.startswith("width:"):
        return _parse_width(str(text).strip(), spec[len("width:"):])
    if m := re.fullmatch(r"(\d+):(\d+)", spec):
        n, m_ = int(m.group(1)), int(m.group(2))
        if not 0 < n < m_:
            raise UserError(f"invalid pattern '{text}': N:M needs 0 < N < M (for example 2:4)")
        return NM(n, m_)
    if m := re.fullmatch(r"(unstructured|structured):([-+0-9.eE]+)", spec):
        try:
            p = float(m.group(2))
        except ValueError:
            raise UserError(f"invalid pattern '{text}': '{m.group(2)}' is not a number; {_HELP}") from None
        if not 0.0 <= p < 1.0:
            raise UserError(f"invalid pattern '{text}': the sparsity must be in [0, 1), got {p:g}")
        return Unstructured(p) if m.group(1) == "unstructured" else Structured(p)
    raise UserError(f"invalid pattern '{text}': {_HELP}")


def check_shape(pattern: Pattern, name: str, in_features: int) -> None:
    """Reject a layer the pattern cannot be applied to, before any work is done."""
    if isinstance(pattern, NM) and in_features % pattern.m:
        raise UserError(
            f"pattern {pattern} does not fit layer '{name}': its input size {in_features} is not a "
            f"multiple of M={pattern.m}; choose an M that divides {in_features}"
        )


# ---------------------------------------------------------------------------------------------
# mask selection


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries of `scores` (any shape), ties by lowest flat index."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask.view_as(scores)
    if k >= flat.numel():
        return mask.fill_(True).view_as(scores)
    # the k-th smallest value: linear-time selection on CPU; CUDA's kthvalue works one slice per
    # thread block, far slower on one big slice than a full sort
    threshold = flat.kthvalue(k).values if flat.device.type == "cpu" else flat.sort().values[k - 1]
    mask = flat < threshold
    missing = k - int(mask.sum())
    ties = (flat == threshold).nonzero().squeeze(1)[:missing]
    mask[ties] = True
    return mask.view_as(scores)


def smallest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries of every row (stable: ties by lowest column)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n smallest entries in every group of m consecutive columns of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.argsort(groups, dim=-1, stable=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def column_mask(pattern: Columns, rows: int, cols: int, device=None) -> torch.Tensor:
    """True in the given columns of every row."""
    dropped = torch.zeros(cols, dtype=torch.bool, device=device)
    dropped[list(pattern.index)] = True
    return dropped.unsqueeze(0).expand(rows, cols).clone()


def mask_for(pattern: Pattern, scores: torch.Tensor, *, per_row: bool) -> torch.Tensor:
    """The mask a score-only method (magnitude, Wanda) prunes.

    unstructured: the P smallest per row (`per_row`, Wanda's comparison group) or over the whole
    matrix (magnitude's single threshold); N:M: the N smallest of every group; structured: the
    columns with the smallest mean score; columns: exactly those.
    """
    rows, cols = scores.shape
    if isinstance(pattern, Columns):
        return column_mask(pattern, rows, cols, scores.device)
    if isinstance(pattern, NM):
        return n_of_m(scores, pattern.n, pattern.m)
    if isinstance(pattern, Structured):
        dropped = smallest(scores.mean(dim=0), pattern.columns(cols))
        return dropped.unsqueeze(0).expand(rows, cols).clone()
    if per_row:
        return smallest_per_row(scores, math.floor(pattern.sparsity * cols + 1e-9))
    return smallest(scores, pattern.zeros(rows, cols))
