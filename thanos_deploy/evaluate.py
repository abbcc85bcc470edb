"""Perplexity: exp(mean next-token cross-entropy) over non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .driver import batch_size


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, device=None, batch_tokens: int = 2048) -> dict:
    """Perplexity of `model` on token windows [n, seqlen]; every window is scored independently."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    home = next(model.parameters()).device
    model.to(device)
    nll, count = 0.0, 0
    try:
        for batch in windows.split(batch_size(windows.shape[1], batch_tokens)):
            batch = batch.to(device)
            nll += next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
            count += batch[:, 1:].numel()
    finally:
        model.to(home)
    return _result(nll, count, windows)


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed cross-entropy of every next token of `batch` [n, seq] under `logits` [n, seq, vocab]."""
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1).to(logits.device), reduction="sum"))


def _result(nll: float, count: int, windows: torch.Tensor) -> dict:
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": count}


def backend_perplexity(backend, windows: torch.Tensor, *, batch_tokens: int = 2048) -> dict:
    """The same perplexity through any runtime backend (torch, ONNX Runtime, TensorRT): the logits
    of a prefill over each window."""
    nll = 0.0
    for batch in windows.split(batch_size(windows.shape[1], batch_tokens)):
        nll += next_token_nll(backend.prefill(batch)[0], batch)
    return _result(nll, windows[:, 1:].numel(), windows)
