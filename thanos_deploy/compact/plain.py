"""The plain Hugging Face form: a narrowed model that is its own standard architecture with smaller
widths in its config, so stock transformers (and any engine that reads Hugging Face checkpoints)
builds exactly its shapes with no code from this package.

`narrowed` is the one way to a narrower config, for both producers of plain artifacts: width
pruning (width.py: MLP neurons, heads, KV groups) and a shrunk model whose MLPs all narrowed alike
(`plain_config`). It checks the new config as transformers does (`config.validate()`) and builds
the model from it on the meta device, so a family that derives one width from another fails
before any work, not at save time.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import models
from ..errors import UserError


def narrowed(model: nn.Module, values: dict[str, int]):
    """(model.config with `values` set, {tensor name: shape} of a model built from it). A config
    transformers refuses is a UserError quoting transformers' reason."""
    config = copy.deepcopy(model.config)
    for field, value in values.items():
        setattr(config, field, value)
    if problem := refusal(config):
        raise UserError(f"{config.model_type} does not accept {', '.join(f'{k}={v}' for k, v in values.items())}: {problem}")
    with torch.device("meta"):
        candidate = type(model)(config)
    return config, {k: tuple(v.shape) for k, v in candidate.state_dict().items()}


def refusal(config) -> str | None:
    """Why transformers' own validation refuses `config` (the innermost line of its error), or None."""
    validate = getattr(config, "validate", None)  # transformers 5; 4.x checks at save time only
    if validate is None:
        return None
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - huggingface_hub's strict-dataclass errors are not ValueErrors
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return lines[-1].removeprefix("ValueError: ") if lines else type(e).__name__
    return None


def plain_config(model: nn.Module, specs: dict) -> dict | None:
    """Set the config's MLP width when the shrunk `model` is a standard architecture; returns
    {field: [old, new]}, or None (and leaves the config alone) when it is not. The field is found
    generically: one holding the old width whose change builds exactly the model's shapes."""
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
        try:
            _, built = narrowed(model, {field: new})
        except UserError:
            continue
        if built == shapes:
            setattr(model.config, field, new)  # the modules share this config object
            return {field: [old, new]}
    return None
