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
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.to(home)
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": count}
