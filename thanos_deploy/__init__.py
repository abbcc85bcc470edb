"""thanos-deploy: prune LLMs with Thanos (and SparseGPT, Wanda, magnitude), then ship them.

Python API:
    prune_weight(weight, inputs, *, method, pattern, **options) -> new weight
    compress_model(model, calib_ids, *, method, pattern, **options) -> report (model pruned in place)
"""

from __future__ import annotations

import torch

from .driver import compress_model
from .errors import UserError
from .methods import METHODS, get_method
from .patterns import check_shape, parse_pattern
from .stats import Stats

__all__ = ["prune_weight", "compress_model", "parse_pattern", "METHODS", "UserError"]
__version__ = "0.1.0"


def prune_weight(weight: torch.Tensor, inputs: torch.Tensor, *, method: str, pattern, **options) -> torch.Tensor:
    """Prune one weight matrix [out, in] given calibration inputs [tokens, in]; returns the new weight."""
    m = get_method(method)
    pattern = parse_pattern(pattern)
    opts = m.options(pattern, options)
    check_shape(pattern, "weight", weight.shape[1])
    stats = Stats.from_inputs(inputs.to(weight.device), hessian=True)
    return m.prune(weight, stats, pattern, **opts)
