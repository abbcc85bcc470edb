"""Perplexity: exp(mean next-token cross-entropy) over non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import data, loading, models
from .errors import UserError, at_least


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, device=None, batch_tokens: int = 2048) -> dict:
    """Perplexity of `model` on token windows [n, seqlen]; every window is scored independently."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    home = next(model.parameters()).device
    model.to(device)
    nll, count = 0.0, 0
    try:
        for batch in windows.split(data.batch_size(windows.shape[1], batch_tokens)):
            batch = batch.to(device)
            nll += next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
            count += batch[:, 1:].numel()
    finally:
        model.to(home)
    return _result(nll, count, windows)


def evaluate(model, tokenizer, source: str, seqlen: int, max_windows: int, device=None) -> dict:
    """Perplexity on the evaluation split of `source` (windows capped at the model's context)."""
    windows = data.windows(data.evaluation_tokens(source, tokenizer), models.context_length(model, seqlen), max_windows)
    return {"data": source, **perplexity(model, windows, device=device)}


def evaluate_model(model: str, source: str = "austen", seqlen: int = 512, max_windows: int = 0, *, device="auto", dtype: str = "auto") -> dict:
    """`eval`: load any model or checkpoint and measure its perplexity (max_windows 0: every window)."""
    if max_windows < 0:
        raise UserError(f"--max-windows must be 0 (all) or positive, got {max_windows}")
    at_least(1, seqlen=seqlen)
    dev = loading.pick_device(device)
    net, tokenizer = loading.load(model, dtype=dtype)
    return {"model": model, **evaluate(net, tokenizer, source, seqlen, max_windows, dev)}


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
    for batch in windows.split(data.batch_size(windows.shape[1], batch_tokens)):
        nll += next_token_nll(backend.prefill(batch)[0], batch)
    return _result(nll, windows[:, 1:].numel(), windows)
