"""Perplexity of a model larger than memory, as `compress --offload` prunes one: the decoder layers
are read from disk one at a time (offload.py), every window's hidden states carried from layer to
layer, and the model's own forward then runs once more per batch with its decoder layers replaced
by those final hidden states, so embeddings, final norm, head and whatever a family applies to its
logits (soft-capping, scales) are its own code. Peak memory: the skeleton (embeddings, head), one
decoder layer and the windows' hidden states."""

from __future__ import annotations

import torch
from torch import nn

from .. import models
from ..evaluate import windows_perplexity
from .offload import free_layer
from .sequential import LayerInputs, capture_inputs


@torch.no_grad()
def perplexity(skeleton: tuple, windows: torch.Tensor, *, device: torch.device, batch_tokens: int = 2048) -> dict:
    """Perplexity on token windows [n, seqlen] of a model loaded as offload.load_skeleton gives it
    (model, tokenizer, weights), one decoder layer in memory at a time."""
    model, _, weights = skeleton
    layers = models.decoder_layers(model)
    inputs = capture_inputs(model, windows, device=device, batch_tokens=batch_tokens)
    as_tuple = False
    for i, layer in enumerate(layers):
        weights.load_into(layer, models.layer_prefix(model, i) + ".", next(model.parameters()).dtype)
        layer.to(device)
        outputs = []
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            out = layer(hidden, *args, **kwargs)
            as_tuple = isinstance(out, (tuple, list))
            outputs.append(out[0] if as_tuple else out)
        inputs = LayerInputs(outputs, inputs.args, inputs.kwargs)
        free_layer(layer)
    name = models.layer_prefix(model, 0).rpartition(".")[0]
    replay = _Replay(iter(inputs.hidden), as_tuple)
    model.set_submodule(name, nn.ModuleList([replay]))
    model.to(device)
    return windows_perplexity(lambda batch: model(input_ids=batch.to(device), use_cache=False).logits, windows, batch_tokens=batch_tokens)


class _Replay(nn.Module):
    """Stands in for every decoder layer: hands the model the final hidden states already computed
    for the batch, in the form its layers return them."""

    def __init__(self, finals, as_tuple: bool):
        super().__init__()
        self.finals, self.as_tuple = finals, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        final = next(self.finals)
        return (final,) if self.as_tuple else final
