"""thanos-deploy: prune LLMs with Thanos (and SparseGPT, Wanda, magnitude), then ship them.

Python API:
    oneshot(model, out, method="thanos", pattern="2:4", ...) -> Result: prune and write the artifact
    prune_weight(weight, inputs, *, method, pattern, **options) -> new weight
    compress_model(model, calib_ids, *, method, pattern, **options) -> report (model pruned in place)
    load(path, device="cpu") -> (model, tokenizer): dense, masked, packed, shrunk or plain checkpoints alike
"""

from __future__ import annotations

import torch

from .errors import UserError
from .loading import load
from .methods import METHODS, get_method
from .oneshot import Result, oneshot
from .patterns import check_shape, parse_pattern
from .pipeline.sequential import compress_model
from .pipeline.stats import Stats

__all__ = ["oneshot", "Result", "prune_weight", "compress_model", "load", "parse_pattern", "METHODS", "UserError"]
__version__ = "0.1.0"


def prune_weight(weight: torch.Tensor, inputs: torch.Tensor, *, method: str, pattern, **options) -> torch.Tensor:
    """Prune one weight matrix [out, in] given calibration inputs [tokens, in]; returns the new weight."""
    m = get_method(method)
    pattern = parse_pattern(pattern)
    opts = m.options(pattern, options)
    check_shape(pattern, "weight", weight.shape[1])
    stats = Stats.from_inputs(inputs.to(weight.device), hessian=True)
    return m.prune(weight, stats, pattern, **opts)
