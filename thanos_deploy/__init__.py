"""thanos-deploy: prune LLMs with Thanos (and SparseGPT, Wanda, magnitude), then ship them.

Python API:
    prune_weight(weight, inputs, *, method, pattern, **options) -> new weight
    compress_model(model, calib_ids, *, method, pattern, **options) -> report (model pruned in place)
    load(path, device="cpu") -> (model, tokenizer): dense, masked, packed or shrunk checkpoints alike
"""

from __future__ import annotations

import torch

from .driver import compress_model
from .errors import UserError
from .methods import METHODS, get_method
from .patterns import check_shape, parse_pattern
from .stats import Stats

__all__ = ["prune_weight", "compress_model", "load", "parse_pattern", "METHODS", "UserError"]
__version__ = "0.1.0"


def prune_weight(weight: torch.Tensor, inputs: torch.Tensor, *, method: str, pattern, **options) -> torch.Tensor:
    """Prune one weight matrix [out, in] given calibration inputs [tokens, in]; returns the new weight."""
    m = get_method(method)
    pattern = parse_pattern(pattern)
    opts = m.options(pattern, options)
    check_shape(pattern, "weight", weight.shape[1])
    stats = Stats.from_inputs(inputs.to(weight.device), hessian=True)
    return m.prune(weight, stats, pattern, **opts)


def load(path: str, *, device="cpu", dtype: str = "auto"):
    """Load any model or checkpoint thanos-deploy understands; returns (model, tokenizer).

    Packed 2:4 linears run PyTorch's semi-structured sparse kernels on CUDA (compute capability
    8.0 or newer) and dense-with-zeros on CPU.
    """
    from . import checkpoint, models

    model, tokenizer = models.load(path, dtype=dtype)
    return checkpoint.place(model, device), tokenizer
