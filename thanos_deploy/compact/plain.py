"""A shrunk model that is a standard architecture: the plain Hugging Face form.

When shrinking only narrowed MLPs (α = 0, the pattern limited to the MLP's consumer) and every
decoder layer kept the same number of channels, the model is its own architecture with a smaller
MLP width: setting that one config field makes stock transformers build exactly these shapes,
so the checkpoint loads with no code from this package (and in any engine that reads Hugging
Face checkpoints). The config field is found generically: a field holding the old width whose
change makes a model built from the config have exactly the shrunk model's tensor shapes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import models


def plain_config(model: nn.Module, specs: dict) -> dict | None:
    """Set the config's MLP width when the shrunk `model` is a standard architecture; returns
    {field: [old, new]}, or None (and leaves the config alone) when it is not."""
    consumers = [s for s in specs.values() if s["kind"] == "linear" and "kept" in s]
    if not consumers or any(s["kind"] != "linear" for s in specs.values()):
        return None  # gathers (CompactLinear) need this package
    old = {s["narrowed_from"][1] for s in consumers}
    new = {s["in_features"] for s in consumers}
    if len(old) != 1 or len(new) != 1 or len(consumers) != len(models.decoder_layers(model)):
        return None  # layers of different widths: no single config value describes them
    old, new = old.pop(), new.pop()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for field, value in model.config.to_dict().items():
        if value != old or isinstance(value, bool):
            continue
        config = copy.deepcopy(model.config)
        setattr(config, field, new)
        with torch.device("meta"):
            candidate = type(model)(config)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            setattr(model.config, field, new)
            return {field: [old, new]}
    return None

