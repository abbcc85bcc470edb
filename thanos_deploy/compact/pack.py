"""The packed N:M weight format: kept values plus the position of each inside its group.

For a weight [rows, in] that is N:M along the input dimension (every group of M consecutive
columns of a row has at least N zeros), K = M - N values are kept per group:

- `values`    [rows, in/M*K], the weight's dtype: the kept values of each group, in column order;
- `positions` of each kept value inside its group, 0..M-1, ceil(log2 M) bits each, packed into
  `meta` [rows, ceil(in/M*K*bits/8)] uint8, little-endian bit order within a row.

For 2:4 that is 2 bits per kept value, 4 values (2 groups) per byte: byte j of a row describes
kept values 4j..4j+3 (groups 2j and 2j+1), value 4j+t in bits 2t..2t+1. The values take half of
the dense bytes and the metadata 1/16 of an fp16 weight's bytes: 0.5625x in all.

Which positions a group keeps: its non-zero entries first, then its negative zeros, then its
first positive zeros, so that unpacking restores every bit, -0.0 included, whenever a group holds
at most K entries that are not +0.0.

`pack_model` turns a model's N:M linears into packed CompactLinears (outlier rows kept as a
separate dense part); `pack`/`unpack` are the on-disk format of their pattern rows.
"""

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


def bits_for(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def pack(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of an N:M weight; a group with more than K non-zeros is an error."""
    rows, cols = weight.shape
    keep = m - n
    groups = weight.reshape(rows, cols // m, m)
    nonzero = groups != 0
    if bool((nonzero.sum(-1) > keep).any()):
        bad = int((nonzero.sum(-1) > keep).any(-1).sum())
        raise UserError(f"the weight is not {n}:{m} along its input dimension ({bad} of {rows} rows break it): it cannot be packed")
    negzero = (groups == 0) & torch.signbit(groups)
    priority = nonzero.to(torch.int8) * 2 + negzero.to(torch.int8)
    # stable sort: highest priority first, ties by position; then restore column order among the kept
    chosen = torch.argsort(-priority, dim=-1, stable=True)[..., :keep]
    positions = chosen.sort(dim=-1).values
    values = groups.gather(-1, positions).reshape(rows, -1)
    return values.contiguous(), _pack_bits(positions.reshape(rows, -1).to(torch.uint8), bits_for(m))


def unpack(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """The dense weight [rows, in] with zeros, bit-exact for what `pack` kept."""
    rows = values.shape[0]
    keep = m - n
    positions = _unpack_bits(meta, bits_for(m), in_features // m * keep).long().reshape(rows, -1, keep)
    dense = torch.zeros(rows, in_features // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(rows, -1, keep))
    return dense.reshape(rows, in_features)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, count = codes.shape
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, count * bits)
    pad = (-stream.shape[1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(rows, -1, 8)
    weights = (1 << torch.arange(8, device=codes.device)).to(torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(meta: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    rows = meta.shape[0]
    shifts = torch.arange(8, device=meta.device, dtype=torch.uint8)
    stream = ((meta.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : count * bits].reshape(rows, count, bits)
    weights = (1 << torch.arange(bits, device=meta.device)).to(torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.uint8)
