"""Calibration activations on disk (`compress --activations-on-disk`): the hidden states that flow
from one decoder layer to the next, for every calibration batch, can take more memory than the
layer itself (nsamples x seqlen x hidden, in and out). On disk they are one safetensors file per
layer boundary with one tensor per batch, written as the batches come out of the layer and read
back (memory-mapped) one batch at a time, so memory holds about one batch, not all of them.

The file is the one the resume machinery keeps in the progress folder (`inputs-0000i.safetensors`),
so the same bytes serve both: nothing more is written to make a run resumable.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .. import models
from ..artifact import TensorWriter
from .offload import fits_in_memory

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


class OnDisk:
    """The hidden states of every calibration batch in a safetensors file; indexing or iterating
    reads one batch (and moves it to `device`), nothing is cached."""

    def __init__(self, path: Path, device):
        self.path, self.device = path, device
        with safe_open(path, "pt") as f:
            self.shapes = [torch.Size(f.get_slice(f"batch.{j}").get_shape()) for j in range(len(f.keys()))]

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < len(self.shapes):
            raise IndexError(j)
        with safe_open(self.path, "pt") as f:  # opened per batch: a mapping kept open would keep every page read resident
            return f.get_tensor(f"batch.{j}").to(self.device)


class Writer(TensorWriter):
    """The batches of one layer boundary, written as they come (artifact.TensorWriter)."""

    def batches(self) -> OnDisk:
        """What was written, to be read back batch by batch (after the `with` block)."""
        return OnDisk(self.path, self.device)


class InMemory(list):
    """The in-memory counterpart of `Writer`: the batches are kept in a list."""

    def __enter__(self) -> "InMemory":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        pass

    def batches(self) -> list[torch.Tensor]:
        return list(self)


def keep(path: Path | None, count: int) -> Writer | InMemory:
    """Where `count` batches of hidden states go as they are produced: memory (no path) or `path`."""
    return InMemory() if path is None else Writer(path, count)


def free_large_blocks_at_once() -> None:
    """Make glibc hand blocks of 1 MiB and more (a batch's hidden states and the layer's
    intermediates) back to the OS as soon as they are freed. By default it raises this threshold
    to the size of each such block freed (up to 32 MiB), after which they come from its heap, where
    freed blocks stay resident: the resident size then grew by about a batch per batch (50 MiB over
    16 batches of 2 MiB), which would undo what keeping the batches on disk saves. Offloaded runs
    set it too: with Thanos's temporaries of every size (per-block slices, solve batches) a 32-layer
    --offload run peaked at 762 MiB above its baseline without it and 403 MiB with it."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to set
        pass


def shapes(batches) -> list[torch.Size]:
    """The shape of every batch, without reading any from disk."""
    return batches.shapes if isinstance(batches, OnDisk) else [b.shape for b in batches]


def nbytes(model: nn.Module, ids: torch.Tensor) -> int:
    """What the hidden states of all calibration windows take, into and out of a decoder layer."""
    itemsize = next(model.parameters()).element_size()
    return 2 * ids.numel() * model.config.hidden_size * itemsize


def wants_on_disk(flag: bool | None, model: nn.Module, ids: torch.Tensor) -> bool:
    """--activations-on-disk / --activations-in-memory as given; by default, on disk when the
    activations and one decoder layer would not fit in the memory available now (the model, or its
    offloaded skeleton, is already loaded, so what is left is what they can use)."""
    if flag is not None:
        return flag
    layer = models.decoder_layers(model)[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    return not fits_in_memory(nbytes(model, ids) + layer_bytes)
