"""The distillation loss, T²·KL(teacher ‖ student) over next-token distributions plus `ce_weight`
times the cross-entropy on the data, computed without ever holding the vocabulary-wide logits of
the whole batch: `chunked` multiplies the heads by the final hidden states a chunk of positions at
a time, and takes each chunk's gradients (with respect to the student's hidden states and head) on
the way, so backward only scales them. `whole` is the same loss on full logits, for families whose
logits are not simply the head applied to the last hidden state (soft-capping, logit scales)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 256 << 20  # float32 logits of one chunk of positions (the student's; the teacher's as many again)


def whole(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float, ce_weight: float):
    """(loss, kl, ce) from full logits [batch, seq, vocab]: KL averaged over positions, CE over next tokens."""
    s, t = student.float().flatten(0, 1), teacher.float().flatten(0, 1)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature**2
    if not ce_weight:
        return kl, kl.detach(), None
    ce = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return kl + ce_weight * ce, kl.detach(), ce.detach()


def chunk_positions(vocab: int) -> int:
    """Positions per chunk: CHUNK_BYTES of float32 logits, at least 16."""
    return max(16, CHUNK_BYTES // (4 * vocab))


def chunked(hidden: torch.Tensor, head: nn.Linear, t_hidden: torch.Tensor, t_head: nn.Linear, ids: torch.Tensor, temperature: float,
            ce_weight: float, chunk: int):
    """(loss, kl, ce) as `whole` gives them for logits = head(hidden), teacher's = t_head(t_hidden)."""
    bias = head.bias if head.bias is not None else None
    loss, kl, ce = _Chunked.apply(hidden, head.weight, bias, t_hidden, t_head.weight, t_head.bias, ids, temperature, ce_weight, chunk)
    return loss, kl, ce if ce_weight else None


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, ids, temperature, ce_weight, chunk):
        batch, seq = ids.shape
        positions, next_tokens = batch * seq, batch * (seq - 1)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()  # the last position predicts nothing
        h, t = hidden.detach().flatten(0, 1), t_hidden.flatten(0, 1)
        w = weight.detach().requires_grad_(True)
        b = bias.detach().requires_grad_(True) if bias is not None else None
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias) if bias is not None else None
        kl_total, ce_total = torch.zeros((), device=h.device), torch.zeros((), device=h.device)
        for a in range(0, positions, chunk):
            with torch.no_grad():
                t_logits = F.linear(t[a:a + chunk], t_weight, t_bias).float()
            with torch.enable_grad():
                hc = h[a:a + chunk].requires_grad_(True)
                logits = F.linear(hc, w, b).float()
                s_scaled, t_scaled = (logits / temperature, t_logits / temperature) if temperature != 1.0 else (logits, t_logits)
                kl = F.kl_div(F.log_softmax(s_scaled, -1), F.log_softmax(t_scaled, -1), log_target=True, reduction="sum") * temperature**2 / positions
                loss = kl
                if ce_weight:
                    ce = F.cross_entropy(logits, targets[a:a + chunk], ignore_index=-100, reduction="sum") / next_tokens
                    loss = kl + ce_weight * ce
                    ce_total += ce.detach()
                grads = torch.autograd.grad(loss, (hc, w) + ((b,) if b is not None else ()))
            grad_h[a:a + chunk] = grads[0]
            grad_w += grads[1]
            if b is not None:
                grad_b += grads[2]
            kl_total += kl.detach()
        ctx.save_for_backward(grad_h.view_as(hidden), grad_w, *((grad_b,) if grad_b is not None else ()))
        ctx.has_bias = grad_b is not None
        ctx.mark_non_differentiable(kl_total, ce_total)
        return kl_total + ce_weight * ce_total, kl_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w, *rest = ctx.saved_tensors
        grad_b = rest[0] * grad_loss if ctx.has_bias else None
        return grad_h * grad_loss, grad_w * grad_loss, grad_b, None, None, None, None, None, None, None
