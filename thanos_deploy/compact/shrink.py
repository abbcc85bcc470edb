"""Physically remove structured-pruned input columns.

A structured-pruned linear has a set Q of input columns that are zero in every row but at most
⌊α·rows⌋ outlier rows. It becomes a CompactLinear that gathers the kept columns and multiplies a
smaller matrix (plus one dense matmul for the outlier rows).

When an MLP's consumer (down_proj, fc2, dense_4h_to_h: models.mlp) has no outlier rows, its zero columns are the MLP
channels nobody reads: they are dropped from the consumer's inputs *and* from the producers'
outputs (gate/up, fc1), so the MLP is simply narrower and needs no gather at all. With outlier
rows in the consumer those channels are still read, and stay.

Kept counts are rounded up to multiples of `round_to` (tensor-core friendly) by keeping some
zero columns back; the manifest records both counts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import models
from ..errors import UserError
from .linear import CompactLinear


def zero_columns(weight: torch.Tensor, max_dense_rows: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, dense_rows): columns zero in all but at most `max_dense_rows` rows, and the rows that are not."""
    rows = weight.shape[0]
    Q = (weight == 0).sum(0) >= rows - max_dense_rows
    dense_rows = torch.nonzero((weight[:, Q] != 0).any(1)).squeeze(1)
    if len(dense_rows) > max_dense_rows:
        raise UserError(
            f"'{name}' is not structured-pruned: {len(dense_rows)} rows use its pruned columns, at most "
            f"{max_dense_rows} outlier rows are allowed"
        )
    return Q, dense_rows


def rounded_keep(pruned: torch.Tensor, round_to: int) -> torch.Tensor:
    """Kept-column mask, grown to a multiple of `round_to` with the first pruned columns."""
    keep = ~pruned
    target = min(len(keep), math.ceil(int(keep.sum()) / round_to) * round_to)
    extra = target - int(keep.sum())
    if extra > 0:
        keep[torch.nonzero(pruned).squeeze(1)[:extra]] = True
    return keep


def shrink_model(model: nn.Module, *, alpha: float = 0.0, round_to: int = 8) -> dict:
    """Replace structured-pruned linears in place; returns the per-module manifest entries."""
    specs: dict[str, dict] = {}
    for i, layer in enumerate(models.decoder_layers(model)):
        prefix = models.layer_prefix(model, i)
        subs = models.linears(layer)
        producers, consumer = models.mlp(subs) or ((), None)
        narrowed = consumer is not None and _narrow_mlp(layer, subs, producers, consumer, alpha, round_to, prefix, specs)
        for name, linear in models.linears(layer).items():
            full = f"{prefix}.{name}"
            if narrowed and name == consumer:  # its zero columns are gone with the channels
                continue
            W = linear.weight.data
            Q, dense_rows = zero_columns(W, math.floor(alpha * W.shape[0] + 1e-9), full)
            keep = rounded_keep(Q, round_to)
            if bool(keep.all()):
                continue
            index = torch.nonzero(keep).squeeze(1)
            layer.set_submodule(name, CompactLinear.shrunk(W, linear.bias, in_index=index, dense_rows=dense_rows))
            specs[full] = {
                **specs.get(full, {}),
                **({} if consumer else {"layout": "gather: no MLP producer/consumer pair found to narrow"}),
                "kind": "shrunk",
                "in_features": W.shape[1],
                "out_features": W.shape[0],
                "kept": int((~Q).sum()),
                "kept_rounded": len(index),
                "dense_rows": len(dense_rows),
                "bias": linear.bias is not None,
            }
    return specs


def _narrow_mlp(layer, subs, producers, consumer, alpha, round_to, prefix, specs) -> bool:
    down = subs[consumer]
    W = down.weight.data
    Q, dense_rows = zero_columns(W, math.floor(alpha * W.shape[0] + 1e-9), f"{prefix}.{consumer}")
    if len(dense_rows) or not bool(Q.any()):
        return False  # outlier rows still read every channel, or nothing to drop
    keep = rounded_keep(Q, round_to)
    channels = torch.nonzero(keep).squeeze(1)
    width = len(channels)
    for name in producers:
        old = subs[name]
        new = nn.Linear(old.in_features, width, bias=old.bias is not None, device=W.device, dtype=W.dtype)
        new.weight.data = old.weight.data[channels].clone()
        if old.bias is not None:
            new.bias.data = old.bias.data[channels].clone()
        layer.set_submodule(name, new)
        specs[f"{prefix}.{name}"] = {"kind": "linear", "in_features": old.in_features, "out_features": width,
                                     "narrowed_from": [old.out_features, old.in_features], "bias": old.bias is not None}
    new = nn.Linear(width, down.out_features, bias=down.bias is not None, device=W.device, dtype=W.dtype)
    new.weight.data = W[:, channels].clone()
    if down.bias is not None:
        new.bias.data = down.bias.data.clone()
    layer.set_submodule(consumer, new)
    specs[f"{prefix}.{consumer}"] = {"kind": "linear", "in_features": width, "out_features": down.out_features,
                                     "narrowed_from": [down.out_features, down.in_features], "kept": int((~Q).sum()),
                                     "kept_rounded": width, "bias": down.bias is not None}
    return True
