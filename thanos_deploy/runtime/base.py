"""The backend interface and greedy generation on top of it."""

from __future__ import annotations

import torch


class Backend:
    """Subclasses implement `step(input_ids, attention_mask, position_ids, state) -> (logits, state)`,
    where `state` is the backend's own KV cache (None before the first step) and logits are a
    float32 CPU tensor [batch, seq, vocab]."""

    def step(self, input_ids, attention_mask, position_ids, state):
        raise NotImplementedError

    def prefill(self, input_ids: torch.Tensor):
        batch, seq = input_ids.shape
        mask = torch.ones(batch, seq, dtype=torch.long)
        positions = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
        logits, cache = self.step(input_ids, mask, positions, None)
        return logits, {"cache": cache, "mask": mask, "ids": input_ids}

    def decode(self, next_ids: torch.Tensor, state: dict):
        batch = next_ids.shape[0]
        length = state["mask"].shape[1]
        mask = torch.cat([state["mask"], torch.ones(batch, 1, dtype=torch.long)], dim=1)
        positions = torch.full((batch, 1), length, dtype=torch.long)
        ids = torch.cat([state["ids"], next_ids], dim=1)
        if state["cache"] is None:  # a graph without KV cache: run the whole sequence again
            logits, _ = self.step(ids, mask, torch.arange(length + 1).expand(batch, -1).contiguous(), None)
            logits = logits[:, -1:]
            cache = None
        else:
            logits, cache = self.step(next_ids, mask, positions, state["cache"])
        return logits, {"cache": cache, "mask": mask, "ids": ids}

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding of `max_new_tokens` tokens; stops early once every sequence produced EOS."""
        ids = input_ids
        if max_new_tokens <= 0:
            return ids
        logits, state = self.prefill(input_ids)
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool((next_ids == eos_token_id).all())):
                break
            logits, state = self.decode(next_ids, state)
        return ids
