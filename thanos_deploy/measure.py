"""Measurements the library and the bench harness share: where a figure was measured (`machine`),
how fast this machine multiplies (`matmul_rate`, what a throughput is a fraction of), how much work
a model does per token (`linear_macs`, `attention_macs_per_position`, `flop_ratio`), and the one
Markdown table writer. The harness (bench/) imports these; nothing here imports the harness."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata

import torch

from .inspection import inspect_model


def machine() -> dict:
    """Where a measurement ran: platform, CPU, threads, GPU, library versions (stored next to the numbers)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=list(torch.cuda.get_device_capability(0)),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    versions = {}
    for name in ("thanos-deploy", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {**info, "versions": versions}


def matmul_rate(device: str | torch.device = "cpu", size: int = 2048, seconds: float = 0.5) -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s (square products of `size`, best of
    about `seconds` of them): what a throughput is a fraction of."""
    device = torch.device(device)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return 2 * size**3 / best


def linear_macs(model, sparse_kernels: bool) -> float:
    """Multiply-adds per token of every linear the model runs (decoder linears as stored, LM head
    dense); attention scores excluded. Packed N:M counts its kept values only where sparse
    kernels run it; elsewhere its zeros are multiplied like any other value."""
    rows = inspect_model(model, None)["rows"]
    head = model.get_output_embeddings()
    ran = lambda r: r["flops_vs_dense"] if sparse_kernels or not r["storage"].startswith("packed") else 1.0  # noqa: E731
    return sum(ran(r) * r["shape"][0] * r["shape"][1] for r in rows) + head.in_features * head.out_features


def attention_macs_per_position(config) -> float | None:
    """Multiply-adds one token spends per position it attends to: QKᵀ and AV in every layer's query
    heads. Column pruning leaves it; fewer heads shrink it (and the KV cache)."""
    heads, layers = getattr(config, "num_attention_heads", None), getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * heads * head_dim


def flop_ratio(dense: dict, candidate: dict, positions: float) -> float | None:
    """Dense model multiply-adds per token over the candidate's, attending to `positions` on average."""
    def macs(facts: dict) -> float | None:
        linear, attention = facts.get("linear_macs_per_token"), facts.get("attention_macs_per_position")
        return None if linear is None or attention is None else linear + attention * positions
    d, c = macs(dense), macs(candidate)
    return d / c if d and c else None


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of one Markdown table ('|' in cells escaped)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)]
