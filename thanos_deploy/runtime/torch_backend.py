"""PyTorch eager: any checkpoint thanos_deploy.load accepts; packed 2:4 linears use the
semi-structured sparse kernels on CUDA (compute capability 8.0+); on CPU every linear runs its
few-row (decode) products on all threads (threaded.py)."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from ..loading import load
from .base import Backend
from .threaded import use_every_thread


class TorchBackend(Backend):
    def __init__(self, target: str, *, device: str = "cpu", dtype: str = "auto"):
        self.model, self.tokenizer = load(target, device=device, dtype=dtype)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            use_every_thread(self.model)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, state):
        cache = state if state is not None else DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device), use_cache=True, **{self.cache_arg: cache},
        )
        return out.logits.float().cpu(), cache
