"""Linear products of a few rows on every CPU thread (decode steps).

MKL runs a product with a handful of rows, a decode step's one token per sequence, on one thread:
on this project's 2-core CPU `F.linear` of one token takes the same time with 1 and 2 threads and
reads the weight at 10-15 GB/s. Splitting the weight's output rows into one block per thread and
running the blocks as one batched product (`torch.bmm`, which runs the batch in parallel) uses
them all: 0.5-0.8x the time at 1 and 4 rows on SmolLM2's shapes (`python bench/decode_products.py`,
which also times 16 rows, the limit). Each output is the same dot product as in `F.linear`,
possibly summed in another order: equal up to float rounding.

Applied by the torch runtime on CPU to every linear, dense and compact alike, so a comparison
between models measures the pruning, not the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compact.linear import CompactLinear

MAX_ROWS = 16  # more rows are left to MKL, which threads them itself (at 64 the split lost on some shapes)
MIN_WEIGHT = 32768  # elements; below this the split's own cost (a few µs) is more than it saves


def threaded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with products of at most MAX_ROWS rows split over the threads."""
    out, width = weight.shape
    rows = x.numel() // width
    threads = torch.get_num_threads()
    if (rows > MAX_ROWS or threads < 2 or out % threads or weight.numel() < MIN_WEIGHT
            or not x.is_cpu or not weight.is_contiguous()):
        return F.linear(x, weight, bias)
    blocks = weight.view(threads, out // threads, width).transpose(1, 2)  # [threads, width, out/threads]
    y = torch.bmm(x.reshape(1, rows, width).expand(threads, rows, width), blocks)  # [threads, rows, out/threads]
    y = y.view(*x.shape[:-1], out) if rows == 1 else y.transpose(0, 1).reshape(*x.shape[:-1], out)
    return y if bias is None else y + bias


class ThreadedLinear(nn.Linear):
    """nn.Linear whose few-row products use every thread (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return threaded_linear(x, self.weight, self.bias)


def use_every_thread(model: nn.Module) -> int:
    """Make every linear of a CPU model run few-row products on all threads; returns how many.

    Plain nn.Linear modules become ThreadedLinear (a subclass: nothing else changes); compact
    modules take threaded_linear as their product."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = ThreadedLinear
            count += 1
        elif isinstance(module, CompactLinear):
            module.product = threaded_linear
            count += 1
    return count
