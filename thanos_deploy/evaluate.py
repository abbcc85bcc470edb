"""Perplexity: exp(mean next-token cross-entropy) over non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import data, models


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, device=None, batch_tokens: int = 2048) -> dict:
    """Perplexity of `model` on token windows [n, seqlen]; every window is scored independently."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    home = next(model.parameters()).device
    model.to(device)
    try:
        return windows_perplexity(lambda batch: model(input_ids=batch.to(device), use_cache=False).logits, windows, batch_tokens=batch_tokens)
    finally:
        model.to(home)


@torch.no_grad()
def windows_perplexity(logits_of, windows: torch.Tensor, *, batch_tokens: int = 2048) -> dict:
    """Perplexity from `logits_of(batch [n, seq]) -> logits [n, seq, vocab]` over the windows, in
    batches of about `batch_tokens` tokens: what every model, backend and trainer is scored by."""
    nll = 0.0
    for batch in windows.split(data.batch_size(windows.shape[1], batch_tokens)):
        nll += next_token_nll(logits_of(batch), batch)
    return _result(nll, windows[:, 1:].numel(), windows)


def evaluate(model, tokenizer, source: str, seqlen: int, max_windows: int, device=None) -> dict:
    """Perplexity on the evaluation split of `source` (windows capped at the model's context)."""
    windows = data.windows(data.evaluation_tokens(source, tokenizer), models.context_length(model, seqlen), max_windows)
    return {"data": source, **perplexity(model, windows, device=device)}


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed cross-entropy of every next token of `batch` [n, seq] under `logits` [n, seq, vocab]."""
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1).to(logits.device), reduction="sum"))


def _result(nll: float, count: int, windows: torch.Tensor) -> dict:
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": count}


def backend_perplexity(backend, windows: torch.Tensor, *, batch_tokens: int = 2048) -> dict:
    """The same perplexity through any runtime backend (torch, ONNX Runtime, TensorRT): the logits
    of a prefill over each window."""
    return windows_perplexity(lambda batch: backend.prefill(batch)[0], windows, batch_tokens=batch_tokens)
