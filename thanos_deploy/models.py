"""The structure of a causal LM, found generically from its modules: the decoder layers, the
linears inside each, and the MLP (producers and consumer of its hidden width).
"""

from __future__ import annotations

from torch import nn

from .errors import UserError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, found generically: the nn.ModuleList whose children are the
    model's `_no_split_modules` classes (the blocks transformers never splits across devices), else
    the module list holding most of the parameters. Every weight inside must be an nn.Linear's."""
    name, layers = _decoder_list(model)
    _check_layer(layers[0], f"{name}.0", getattr(model.config, "model_type", type(model).__name__))
    return layers


def context_length(model: nn.Module, seqlen: int) -> int:
    """`seqlen` capped at the model's maximum context (max_position_embeddings), when it has one."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(seqlen, limit) if limit else seqlen


def layer_prefix(model: nn.Module, index: int) -> str:
    """Full module name of decoder layer `index`, e.g. 'model.layers.3'."""
    return f"{_decoder_list(model)[0]}.{index}"


def _decoder_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    found = [(n, m) for n, m in lists if all(type(c).__name__ in blocks for c in m)]
    if not found:  # no declared block class: the list holding most parameters, if it holds most of them
        size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        found = sorted(lists, key=lambda nm: -size(nm[1]))[:1]
        if found and size(found[0][1]) < 0.5 * size(model):
            found = []
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if len(found) != 1:
        what = ", ".join(f"{n} ({len(m)} × {type(m[0]).__name__})" for n, m in found) or "no list of repeated blocks"
        raise UserError(
            f"unsupported architecture '{kind}': cannot tell which module list holds the decoder layers (found {what}); "
            "pass a decoder-only causal language model"
        )
    return found[0]


def _check_layer(layer: nn.Module, name: str, kind: str) -> None:
    """Refuse weights that pruning nn.Linear modules would silently skip (MoE experts, Conv1D)."""
    owned = {id(p) for m in layer.modules() if is_linear(m) for p in m.parameters(recurse=False)}
    for pname, p in sorted(layer.named_parameters(), key=lambda item: -item[1].ndim):  # expert tensors first
        if p.ndim < 2 or id(p) in owned:
            continue
        where = f"{name}.{pname} {list(p.shape)}"
        if p.ndim >= 3:
            raise UserError(
                f"unsupported architecture '{kind}': {where} holds mixture-of-experts weights (one matrix per expert); "
                "thanos-deploy prunes dense decoder-only models only"
            )
        raise UserError(
            f"unsupported architecture '{kind}': {where} is a 2-D weight outside nn.Linear (GPT-2-style Conv1D, stored "
            "transposed); thanos-deploy prunes models whose decoder layers use nn.Linear"
        )


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a module that stands in for one (compact/linear.py's CompactLinear says so)."""
    return isinstance(module, nn.Linear) or getattr(module, "stands_in_for_linear", False)


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder layer, by its name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


# consumer linear's name -> the linears producing the channels it reads (the MLP's hidden width);
# matched on the last component of module names, so it holds for every family that uses them.
MLP_NAMES = {
    "down_proj": ("gate_proj", "up_proj"),
    "fc2": ("fc1",),
    "dense_4h_to_h": ("dense_h_to_4h",),
}


def mlp(subs: dict[str, nn.Module]) -> tuple[tuple[str, ...], str] | None:
    """(producers, consumer) of the layer's MLP among its linears `subs`, or None when not found:
    a consumer named in MLP_NAMES whose siblings produce exactly the channels it reads."""
    for name, consumer in subs.items():
        parent, _, leaf = name.rpartition(".")
        producers = tuple(f"{parent}.{p}" if parent else p for p in MLP_NAMES.get(leaf, ()))
        if producers and all(p in subs and subs[p].out_features == consumer.in_features for p in producers):
            return producers, name
    return None
