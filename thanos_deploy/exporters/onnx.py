"""Export a causal LM to ONNX with Optimum's input/output names, then verify it.

Graph (default, with KV cache; one graph serves prefill with an empty past and decode):
    input_ids [batch, seq], attention_mask [batch, past+seq], position_ids [batch, seq],
    past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]
 -> logits [batch, seq, vocab], present.{i}.key|value [batch, kv_heads, past+seq, head_dim]
`--no-past` gives input_ids, attention_mask, position_ids -> logits.

The dynamo exporter is tried first, the legacy TorchScript exporter is the fallback. The graph is
traced with more than one new token and a non-empty past (with one new token the exported graph
breaks for longer inputs), weights are initializers, external data is used above 2 GB, and fp16
export casts the model first so the graph itself is fp16 (TensorRT 11 has no FP16 flag).

Every export is verified: the ONNX checker, then ONNX Runtime against PyTorch on two shapes (and
a decode step with a non-empty past), max abs difference printed and an error above tolerance,
and the 2:4-along-K report of every MatMul/Gemm weight.
"""

from __future__ import annotations

import inspect
import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import Dim
from transformers import DynamicCache

from ..artifact import check_output, staged
from ..errors import UserError
from ..loading import load
from ..runtime.ort import create_session
from . import sparsity

TWO_GB = 2**31
TOLERANCE = {"fp32": 1e-3, "fp16": 0.1}  # max abs logit difference, ORT vs PyTorch


def input_names(num_layers: int, with_past: bool = True) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    if with_past:
        names += [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return names


def output_names(num_layers: int, with_past: bool = True) -> list[str]:
    names = ["logits"]
    if with_past:
        names += [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return names


def cache_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of the model's KV cache."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv, head_dim


class DecoderGraph(nn.Module):
    """Flat-tensor signature around a Hugging Face causal LM (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past
        self.num_layers = model.config.num_hidden_layers
        # transformers 5 renames `past_key_values` to `cache`; use whichever this model takes
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if not self.with_past:
            return self.model(**kwargs, use_cache=False).logits
        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(**kwargs, **{self.cache_arg: cache}, use_cache=True)
        present = getattr(out, "cache", None) or out.past_key_values
        flat = []
        for layer in present.layers[: self.num_layers]:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def sample_inputs(config, batch: int, seq: int, past: int, with_past: bool, dtype, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    if not with_past:
        return (ids, mask, positions)
    kv, head_dim = cache_shape(config)
    cache = [torch.randn(batch, kv, past, head_dim, generator=g).to(dtype) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, positions, *cache)


def _export_dynamo(graph: DecoderGraph, args: tuple, path: Path, external: bool) -> None:
    batch, seq, past, total = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length"), Dim("total_sequence_length")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}, "position_ids": {0: batch, 1: seq}}
    if graph.with_past:
        shapes["past"] = tuple({0: batch, 2: past} for _ in range(2 * graph.num_layers))
    torch.onnx.export(
        graph, args, str(path), dynamo=True, external_data=external, dynamic_shapes=shapes,
        input_names=input_names(graph.num_layers, graph.with_past), output_names=output_names(graph.num_layers, graph.with_past),
        verbose=False,
    )


def _export_legacy(graph: DecoderGraph, args: tuple, path: Path, external: bool) -> None:
    names_in = input_names(graph.num_layers, graph.with_past)
    names_out = output_names(graph.num_layers, graph.with_past)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    for name in names_in[3:]:
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in names_out[1:]:
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), dynamo=False, input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True)
    if external:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")


def verify(path: Path, graph: DecoderGraph, config, dtype_name: str) -> dict:
    """ORT vs PyTorch on two shapes (with past: an empty past, then a decode step on a non-empty one)."""
    onnx.checker.check_model(str(path))
    session = create_session(path, "cpu")
    dtype = next(graph.parameters()).dtype
    cases = [(1, 7, 0), (2, 4, 6), (1, 1, 9)] if graph.with_past else [(1, 7, 0), (2, 11, 0)]
    names = input_names(graph.num_layers, graph.with_past)
    checks = []
    for batch, seq, past in cases:
        args = sample_inputs(config, batch, seq, past, graph.with_past, dtype, seed=seq)
        with torch.no_grad():
            expected = graph(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        diffs = [float(np.abs(g.astype(np.float64) - e.double().numpy()).max()) for g, e in zip(got, expected)]
        checks.append({"batch": batch, "seq": seq, "past": past, "max_abs_logits": diffs[0], "max_abs_present": max(diffs[1:], default=0.0)})
    worst = max(max(c["max_abs_logits"], c["max_abs_present"]) for c in checks)
    if worst > TOLERANCE[dtype_name]:
        raise UserError(f"exported graph disagrees with PyTorch: max abs difference {worst:.3g} > {TOLERANCE[dtype_name]}")
    return {"checks": checks, "max_abs_diff": worst, "tolerance": TOLERANCE[dtype_name]}


def export_onnx(model: nn.Module, folder: Path, *, dtype: str = "fp32", with_past: bool = True, exporter: str = "auto") -> dict:
    """Export `model` into `folder` (model.onnx [+ model.onnx.data]); returns the export report."""
    if dtype not in TOLERANCE:
        raise UserError(f"unknown export dtype '{dtype}': use fp32 or fp16")
    model = model.to(torch.float16 if dtype == "fp16" else torch.float32).eval()
    graph = DecoderGraph(model, with_past).eval()
    config = model.config
    path = folder / "model.onnx"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > TWO_GB
    args = sample_inputs(config, 2, 3, 5 if with_past else 0, with_past, next(model.parameters()).dtype)
    used, fallback = None, None
    t0 = time.perf_counter()
    for name, fn in (("dynamo", _export_dynamo), ("legacy", _export_legacy)):
        if exporter not in ("auto", name):
            continue
        try:
            with torch.no_grad():
                fn(graph, args, path, external)
            used = name
            break
        except Exception as e:  # the fallback is the point: record why
            fallback = f"{name} exporter failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            for p in folder.glob("model.onnx*"):
                p.unlink()
    if used is None:
        raise UserError(f"ONNX export failed ({fallback})")
    seconds = time.perf_counter() - t0
    report = {
        "exporter": used,
        "fallback_reason": fallback if used != "dynamo" and exporter == "auto" else None,
        "dtype": dtype,
        "with_past": with_past,
        "external_data": external,
        "export_seconds": round(seconds, 2),
        "inputs": input_names(config.num_hidden_layers, with_past),
        "outputs": output_names(config.num_hidden_layers, with_past),
        "verification": verify(path, graph, config, dtype),
    }
    rows = sparsity.check_model(path)
    report["two_four"] = {"weights": len(rows), "two_four_along_k": sum(r["two_four"] for r in rows), "rows": rows}
    return report


def write_artifact(model, tokenizer, out: Path, *, dtype: str, with_past: bool, exporter: str = "auto", overwrite: bool = False) -> dict:
    """Export into a fresh folder with config, tokenizer and export_report.json, atomically."""
    with staged(out, overwrite) as tmp:
        report = export_onnx(model, tmp, dtype=dtype, with_past=with_past, exporter=exporter)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def export_checkpoint(model: str, out: Path, *, dtype: str = "fp32", with_past: bool = True, exporter: str = "auto",
                      overwrite: bool = False) -> dict:
    """`export onnx`: check the options and the output, load any checkpoint, export and verify it."""
    if dtype not in TOLERANCE:
        raise UserError(f"unknown --dtype '{dtype}': use fp32 or fp16")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise UserError(f"unknown --exporter '{exporter}': use auto, dynamo or legacy")
    check_output(out, overwrite)
    net, tokenizer = load(model)
    return write_artifact(net, tokenizer, out, dtype=dtype, with_past=with_past, exporter=exporter, overwrite=overwrite)
