"""Pack N:M-pruned linears: the pattern rows become packed values + metadata on disk (packing.py),
the outlier rows a separate dense part."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import models
from ..errors import UserError
from ..patterns import NM
from .linear import CompactLinear


def pack_model(model: nn.Module, pattern: NM, *, alpha: float = 0.0) -> dict:
    """Replace every N:M linear by a packed CompactLinear in place; returns the manifest entries."""
    specs: dict[str, dict] = {}
    for i, layer in enumerate(models.decoder_layers(model)):
        prefix = models.layer_prefix(model, i)
        for name, linear in models.linears(layer).items():
            full = f"{prefix}.{name}"
            W = linear.weight.data
            if W.shape[1] % pattern.m:
                raise UserError(f"'{full}' has {W.shape[1]} inputs, not a multiple of {pattern.m}: it cannot be packed as {pattern}")
            zeros = (W.reshape(W.shape[0], -1, pattern.m) == 0).sum(-1)
            dense_rows = torch.nonzero((zeros < pattern.n).any(1)).squeeze(1)
            allowed = math.floor(alpha * W.shape[0] + 1e-9)
            if len(dense_rows) > allowed:
                raise UserError(
                    f"'{full}' violates {pattern} along its input dimension in {len(dense_rows)} rows "
                    f"(at most {allowed} outlier rows allowed): it cannot be packed"
                )
            layer.set_submodule(name, CompactLinear.packed_rows(W, linear.bias, dense_rows=dense_rows, pattern=(pattern.n, pattern.m)))
            specs[full] = {
                "kind": "packed", "n": pattern.n, "m": pattern.m, "in_features": W.shape[1], "out_features": W.shape[0],
                "dense_rows": len(dense_rows), "bias": linear.bias is not None,
            }
    return specs
