"""What a checkpoint really holds, linear by linear: shape, storage, density, 2:4 validity along the
input (reduction) axis, outlier rows, FLOPs and bytes relative to the dense layer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import loading, models
from .artifact import Manifest
from .compact.linear import CompactLinear
from .compact.pack import pack


def two_four_rows(weight) -> tuple[int, int]:
    """(rows whose every group of 4 along the input axis has >= 2 zeros, rows checked)."""
    if weight.shape[1] % 4:
        return 0, weight.shape[0]
    zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
    return int((zeros >= 2).all(1).sum()), weight.shape[0]


def _row(name: str, module: nn.Module, spec: dict) -> dict:
    out, inp = spec.get("narrowed_from") or [module.out_features, module.in_features]
    size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
    bias = size(module.bias)
    if isinstance(module, CompactLinear):
        dense = module.dense()
        d = 0 if module.dense_rows is None else len(module.dense_rows)
        kept = module.in_features if module.in_index is None else len(module.in_index)
        main = module.weight.data if type(module.weight.data) is torch.Tensor else module.weight.data.to_dense()
        if module.packed:
            n, m = module.packed
            values, meta = pack(main, n, m)
            stored = size(values) + size(meta)
            macs = main.shape[0] * module.in_features * (m - n) / m
            storage = f"packed {n}:{m}"
            macs += d * module.in_features
        else:
            stored = size(main) + size(module.in_index) + size(module.dense_index)
            macs = main.shape[0] * kept + d * (module.in_features - kept)
            storage = "shrunk (gather)" if spec.get("layout", "").startswith("gather") else "shrunk"
        stored += size(module.dense_weight) + size(module.dense_rows) + bias
        checked = main if module.packed else dense
    else:
        dense = module.weight.data
        d = 0
        stored = size(dense) + bias
        macs = dense.numel()
        storage = "narrowed" if spec.get("narrowed_from") else ("masked" if bool((dense == 0).any()) else "dense")
        checked = dense
    valid, rows = two_four_rows(checked)
    return {
        "name": name,
        "shape": [out, inp],
        "storage": storage,
        "density": float((dense != 0).sum()) / (out * inp),
        "two_four": valid == rows,
        "two_four_rows": f"{valid}/{rows}",
        "outlier_rows": d,
        "flops_vs_dense": macs / (out * inp),
        "bytes": stored,
        "dense_bytes": out * inp * dense.element_size() + bias,
    }


def inspect_model(model: nn.Module, manifest: Manifest | None) -> dict:
    """Rows for every linear of every decoder layer, and totals."""
    specs = (manifest.modules if manifest else None) or {}
    rows = []
    for i, layer in enumerate(models.decoder_layers(model)):
        prefix = models.layer_prefix(model, i)
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, CompactLinear)):
                rows.append(_row(f"{prefix}.{name}", module, specs.get(f"{prefix}.{name}", {})))
    dense_macs = sum(r["shape"][0] * r["shape"][1] for r in rows)
    totals = {
        "linears": len(rows),
        "density": sum(r["density"] * r["shape"][0] * r["shape"][1] for r in rows) / dense_macs,
        "flops_vs_dense": sum(r["flops_vs_dense"] * r["shape"][0] * r["shape"][1] for r in rows) / dense_macs,
        "bytes": sum(r["bytes"] for r in rows),
        "dense_bytes": sum(r["dense_bytes"] for r in rows),
        "two_four_linears": sum(r["two_four"] for r in rows),
    }
    return {"storage": manifest.storage if manifest else "masked", "rows": rows, "totals": totals}


def inspect_checkpoint(target: str) -> dict:
    """`inspect`: load a checkpoint (or any model spec) and describe it with its manifest."""
    model, _ = loading.load(target)
    folder = Path(target)
    return inspect_model(model, Manifest.read(folder) if folder.is_dir() else None)
