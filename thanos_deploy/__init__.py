"""thanos-deploy: prune LLMs with Thanos (and SparseGPT, Wanda, magnitude), then ship them.

Python API:
    prepare(model, out=..., method="thanos", pattern="2:4", ...) -> CompressRequest: checked once, before any work
    oneshot(request) -> Result: prune and write the artifact
    prune_weight(weight, inputs, Pruning("thanos", "2:4")) -> new weight
    compress_model(model, calib_ids, Pruning("thanos", "2:4")) -> report (model pruned in place)
    recover(RecoverRequest(...)) -> the log of a distillation that keeps pruned weights pruned
    load(path, device="cpu") -> (model, tokenizer): dense, masked, packed, shrunk or plain artifacts alike
"""

from __future__ import annotations

import torch

from .errors import UserError
from .loading import load
from .methods import METHODS
from .methods.stats import Stats
from .oneshot import Result, oneshot
from .patterns import check_shape, parse_pattern
from .pipeline.sequential import compress_model
from .recovery import recover
from .request import Calibration, CompressRequest, Evaluation, Execution, Output, Pruning, RecoverRequest, Teacher, Training, prepare

__all__ = ["prepare", "oneshot", "Result", "prune_weight", "compress_model", "recover", "load", "parse_pattern", "METHODS", "UserError",
           "CompressRequest", "Pruning", "Calibration", "Output", "Execution", "Evaluation", "RecoverRequest", "Teacher", "Training"]
__version__ = "0.1.0"


def prune_weight(weight: torch.Tensor, inputs: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    """Prune one weight matrix [out, in] given calibration inputs [tokens, in]; returns the new weight."""
    check_shape(pruning.pattern, "weight", weight.shape[1])
    stats = Stats.from_inputs(inputs.to(weight.device), hessian=True)
    return pruning.method.prune(weight, stats, pruning.pattern, **pruning.options)
