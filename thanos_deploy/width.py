"""Width pruning: whole units out of every decoder layer alike, so the result is a standard
architecture with smaller widths in its config (one number per field, as vLLM, TensorRT-LLM,
llama.cpp and stock transformers need).

Units, per decoder layer:
- MLP neurons: a column of the consumer (down_proj, fc2, ...) and the matching rows of its producers;
- query heads inside each KV group (the same count kept in every group): head_dim columns of the
  attention consumer (o_proj) and the matching q rows;
- whole KV groups: their q, k and v rows and o_proj columns.

Units are chosen by the consumer's column scores (the method's `column_score`) summed per unit. The
consumer is then pruned with the method on exactly those columns (`Columns`): Thanos moves the rest
with the exact multi-column OBS solve, SparseGPT column by column to the right, Wanda and magnitude
not at all. Producers simply lose rows (zeroed here; `narrow` removes them). In the masked form the
removed units contribute nothing (their consumer columns are zero), so its logits are the narrowed
model's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .compact.plain import narrowed, refusal
from .errors import UserError
from .patterns import WIDTH_FRACTIONS, Columns, Width

FUSED_QKV = ("qkv_proj",)  # fused attention producers laid out [q | k | v] (Phi-3); other fused layouts are refused
FUSED_MLP = {"down_proj": "gate_up_proj"}  # consumer -> a producer laid out [gate | up] (Phi-3)


@dataclass(frozen=True)
class Widths:
    """The model's widths before and after: (intermediate_size, num_attention_heads, num_key_value_heads)."""

    old: tuple[int, int, int]
    new: tuple[int, int, int]
    head_dim: int

    def describe(self) -> str:
        names = list(WIDTH_FRACTIONS.values())
        return ", ".join(f"{n} {o} → {w}" if o != w else f"{n} {o}" for n, o, w in zip(names, self.old, self.new)) + f" (head_dim {self.head_dim})"

    def advice(self) -> str | None:
        """What engines do with an MLP width that is not a multiple of 16, when one was asked for."""
        width = self.new[0]
        if width == self.old[0] or width % 16 == 0:
            return None
        lower, upper = width // 64 * 64, -(-width // 64) * 64
        return (f"intermediate_size {width} is not a multiple of 16: llama.cpp's fast CPU matrix path skips ffn_down (prompt processing "
                f"measured at 0.55-0.79x dense for 1075), its q8_0 keeps such tensors in f16 (needs multiples of 32) as the k-quants do "
                f"(256), and GPU tensor cores want multiples of 8 to 64; prefer {lower or 64} or {upper}, or mlp=F (rounded to multiple=64)")


@dataclass(frozen=True)
class Units:
    """Where one decoder layer's units live (linear names relative to the layer)."""

    mlp_consumer: str
    mlp_producers: tuple[tuple[str, int], ...]  # (linear, first row of its block of intermediate_size rows)
    attn_consumer: str
    q: tuple[str, int]  # (linear, first row of the query rows)
    kv: tuple[tuple[str, int], ...]  # (linear, first row) of the key rows and of the value rows


def config_widths(config) -> tuple[tuple[int, int, int], int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (getattr(config, mlp_field(config)), heads, kv), head_dim


def mlp_field(config) -> str:
    """The config field that holds the MLP width (families name it differently)."""
    for field in ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner"):
        if isinstance(getattr(config, field, None), int):
            return field
    raise UserError(f"unsupported architecture '{config.model_type}': its config names no MLP width (intermediate_size or similar)")


def plan(pattern: Width, config) -> Widths:
    """The widths `pattern` asks for, rounded to the nearest layout the architecture allows (whole
    units; the same number of query heads in every KV group); impossible requests are a UserError."""
    (mlp, heads, kv), head_dim = config_widths(config)
    fractions, targets = dict(pattern.fractions), dict(pattern.targets)
    new_mlp = targets.get("intermediate_size", mlp)
    if fractions.get("intermediate_size"):  # what a fraction leaves, to the nearest multiple engines run fast
        if pattern.multiple > mlp:
            raise UserError(f"width: multiple={pattern.multiple} is larger than the model's MLP width {mlp}: give a multiple up to {mlp}")
        left = mlp * (1 - fractions["intermediate_size"])
        new_mlp = max(pattern.multiple, pattern.multiple * round(left / pattern.multiple)) if round(left) >= 1 else 0
    new_kv = targets.get("num_key_value_heads", round(kv * (1 - fractions.get("num_key_value_heads", 0.0))))
    group = heads // kv
    if "num_attention_heads" in targets:
        new_heads = targets["num_attention_heads"]
    elif group == 1:  # one query head per KV group: a head is a group
        new_kv = min(new_kv, round(kv * (1 - fractions.get("num_attention_heads", 0.0))))
        new_heads = new_kv
    else:
        new_heads = new_kv * round(group * (1 - fractions.get("num_attention_heads", 0.0)))
    for name, old, new in (("intermediate_size", mlp, new_mlp), ("num_key_value_heads", kv, new_kv), ("num_attention_heads", heads, new_heads)):
        if new > old:
            raise UserError(f"width: {name}={new} is larger than the model's {old}: give a count up to {old}")
        if new < 1:
            raise UserError(f"width: this leaves no unit of {name} (the model has {old}): remove a smaller fraction")
    if group == 1 and new_heads != new_kv:
        raise UserError(f"width: this model has one query head per KV group, so num_attention_heads ({new_heads}) and "
                        f"num_key_value_heads ({new_kv}) go together: give the same count for both")
    if new_heads % new_kv or new_heads // new_kv > group:
        raise UserError(f"width: {new_heads} query heads cannot be spread evenly over {new_kv} KV groups of at most {group}: "
                        f"give a multiple of {new_kv} up to {new_kv * group}")
    if (new_heads, new_kv) != (heads, kv) and (problem := _heads_refused(config, new_heads, new_kv, head_dim)):
        accepted = [h for h in range(new_kv, new_kv * group + 1, new_kv) if not _heads_refused(config, h, new_kv, head_dim)]
        raise UserError(f"width: {config.model_type} does not accept {new_heads} query heads with {new_kv} KV heads ({problem}); "
                        f"with {new_kv} KV heads its config accepts {_listing(accepted)} query heads (they must be a multiple of the "
                        f"KV heads, and transformers checks the hidden size {config.hidden_size} against them): give heads= or "
                        "num_attention_heads= for one of those")
    return Widths((mlp, heads, kv), (new_mlp, new_heads, new_kv), head_dim)


def _heads_refused(config, heads: int, kv: int, head_dim: int) -> str | None:
    """transformers' reason to refuse a config with these head counts, or None."""
    candidate = copy.deepcopy(config)
    candidate.num_attention_heads, candidate.num_key_value_heads = heads, kv
    try:
        candidate.head_dim = head_dim
    except AttributeError:  # derived from the other widths (a property): plain_config refuses such a family later
        pass
    return refusal(candidate)


def _listing(counts: list[int]) -> str:
    if not counts:
        return "no count of"
    return ", ".join(map(str, counts[:-1])) + (" or " if len(counts) > 1 else "") + str(counts[-1])


def find_units(layer: nn.Module, config, where: str) -> Units:
    """The layer's MLP and attention units, found from module shapes (and the consumer names of
    models.MLP_NAMES); a layout this cannot read is a UserError naming the module."""
    subs = models.linears(layer)
    (mlp, heads, kv), head_dim = config_widths(config)
    hidden = config.hidden_size
    found = models.mlp(subs)
    if found:
        producers, consumer = found
        mlp_producers = tuple((p, 0) for p in producers)
    else:
        fused = [(c, f"{c.rpartition('.')[0]}.{p}".lstrip(".")) for c in subs for leaf, p in FUSED_MLP.items() if c.rpartition(".")[2] == leaf]
        fused = [(c, p) for c, p in fused if p in subs and subs[p].out_features == 2 * mlp and subs[c].in_features == mlp]
        if not fused:
            raise UserError(f"width: cannot find the MLP of {where} (a consumer such as down_proj and its producers): this family's MLP layout is not supported")
        consumer, producer = fused[0]
        mlp_producers = ((producer, 0), (producer, mlp))
    # the attention output projection: from heads×head_dim to hidden, the last such linear in the
    # layer's definition order (where heads×head_dim = hidden the query projection has that shape too)
    attn = [n for n, m in subs.items() if n != consumer and m.in_features == heads * head_dim and m.out_features == hidden][-1:]
    if not attn:
        raise UserError(f"width: cannot find the attention output projection of {where} (a linear from {heads}×{head_dim} to {hidden})")
    parent = attn[0].rpartition(".")[0]
    siblings = {n: m for n, m in subs.items() if n.rpartition(".")[0] == parent and n != attn[0] and m.in_features == hidden}
    fused_qkv = [n for n, m in siblings.items() if m.out_features == (heads + 2 * kv) * head_dim]
    if fused_qkv:
        name = fused_qkv[0]
        if name.rpartition(".")[2] not in FUSED_QKV:
            raise UserError(f"width: {where}.{name} fuses queries, keys and values in a layout width pruning does not read "
                            f"(it reads {', '.join(FUSED_QKV)}: [q | k | v]); prune this family with structured:P instead")
        return Units(consumer, mlp_producers, attn[0], (name, 0), ((name, heads * head_dim), (name, (heads + kv) * head_dim)))
    q = [n for n, m in siblings.items() if m.out_features == heads * head_dim]
    k_v = [n for n, m in siblings.items() if m.out_features == kv * head_dim and n not in q[:1]]
    if len(q) < 1 or len(k_v) != 2:
        fused = ", ".join(f"{where}.{n} ({m.out_features} outputs)" for n, m in siblings.items())
        raise UserError(f"width: cannot find separate query, key and value projections of {where} next to {attn[0]} (found {fused or 'none'}): "
                        "this attention layout is not supported; prune this family with structured:P instead")
    return Units(consumer, mlp_producers, attn[0], (q[0], 0), ((k_v[0], 0), (k_v[1], 0)))


def check_heads(layer: nn.Module, units: Units, widths: Widths, where: str) -> None:
    """Removing heads must leave the other heads' arithmetic alone: a norm over all heads together
    (OLMo 2's q_norm over heads×head_dim) would change, so such a family keeps its heads."""
    (_, heads, kv), d = widths.old, widths.head_dim
    if widths.new[1:] == widths.old[1:]:
        return
    path = units.attn_consumer.rpartition(".")[0]
    parent = layer.get_submodule(path) if path else layer
    for name, module in parent.named_modules():
        name = ".".join(filter(None, (path, name)))
        if isinstance(module, nn.Linear):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim == 1 and p.numel() in (heads * d, kv * d) and p.numel() != d:
                raise UserError(f"width: {where}.{name}.{pname} acts on all heads together ({p.numel()} values): removing heads would change it; "
                                "prune MLP neurons only (width:mlp=F) for this family")


def check_model(model: nn.Module, widths: Widths) -> list[Units]:
    """Every layer's units, before any work (a layout this cannot read fails here)."""
    prefix = models.layer_prefix(model, 0).rpartition(".")[0]
    units = []
    for i, layer in enumerate(models.decoder_layers(model)):
        units.append(find_units(layer, model.config, f"{prefix}.{i}"))
        check_heads(layer, units[-1], widths, f"{prefix}.{i}")
    return units


def choose(method, units: Units, layer: nn.Module, stats_of, widths: Widths) -> dict:
    """The units this layer keeps: MLP neurons, query heads (indices in the old order), KV groups."""
    (_, heads, kv), (new_mlp, new_heads, new_kv), d = widths.old, widths.new, widths.head_dim
    mlp_score = method.column_score(layer.get_submodule(units.mlp_consumer).weight.data, stats_of(units.mlp_consumer))
    keep_mlp = sorted(torch.topk(mlp_score, new_mlp).indices.tolist())
    head_score = method.column_score(layer.get_submodule(units.attn_consumer).weight.data, stats_of(units.attn_consumer)).view(heads, d).sum(1)
    group = heads // kv
    by_group = head_score.view(kv, group)
    keep_groups = sorted(torch.topk(by_group.sum(1), new_kv).indices.tolist())
    per_group = new_heads // new_kv
    keep_heads = sorted(g * group + int(h) for g in keep_groups for h in torch.topk(by_group[g], per_group).indices.tolist())
    return {"mlp": keep_mlp, "heads": keep_heads, "kv_heads": keep_groups}


def prune_units(method, options: dict, units: Units, layer: nn.Module, stats_of, widths: Widths) -> tuple[dict, dict]:
    """Prune one layer's units in place (masked form); returns (kept units, {linear: weight before})."""
    kept = choose(method, units, layer, stats_of, widths)
    d = widths.head_dim
    before = {}
    gone_mlp = sorted(set(range(widths.old[0])) - set(kept["mlp"]))
    gone_heads = sorted(set(range(widths.old[1])) - set(kept["heads"]))
    for consumer, columns in ((units.mlp_consumer, gone_mlp), (units.attn_consumer, [h * d + j for h in gone_heads for j in range(d)])):
        linear = layer.get_submodule(consumer)
        before[consumer] = linear.weight.data
        linear.weight.data = method.prune(linear.weight.data, stats_of(consumer), Columns(tuple(columns)), **options).to(linear.weight.dtype)
    for name, rows in _rows(units, kept, widths, removed=True).items():
        linear = layer.get_submodule(name)
        before.setdefault(name, linear.weight.data)
        linear.weight.data = linear.weight.data.clone()
        linear.weight.data[rows] = 0  # the consumer's columns are zero already: this changes no output,
        if linear.bias is not None:   # it makes the masked form the narrowed one entry by entry
            linear.bias.data[rows] = 0
    return kept, before


def _rows(units: Units, kept: dict, widths: Widths, *, removed: bool = False) -> dict[str, list[int]]:
    """Per producer, the rows the narrowed model keeps (or, with `removed`, drops), in order."""
    (mlp, heads, kv), d = widths.old, widths.head_dim
    blocks = [(name, first, 1, mlp, kept["mlp"]) for name, first in units.mlp_producers]  # (linear, first row, rows per unit, units, kept)
    blocks.append((units.q[0], units.q[1], d, heads, kept["heads"]))
    blocks += [(name, first, d, kv, kept["kv_heads"]) for name, first in units.kv]
    out: dict[str, list[int]] = {}
    for name, first, size, count, keep in blocks:
        chosen = sorted(set(range(count)) - set(keep)) if removed else keep
        out.setdefault(name, []).extend(first + u * size + j for u in chosen for j in range(size))
    return out


def plain_config(model: nn.Module, units: list[Units], widths: Widths) -> tuple[object, dict]:
    """(the config with the new widths, {field: [old, new]}): checked before any work by
    compact/plain.narrowed (transformers' validation, then the model built on the meta device),
    so that every pruned linear gets exactly its narrowed shape (a family that derives one width
    from another, such as head_dim from hidden_size / heads, fails here)."""
    heads, (new_mlp, new_heads, new_kv), d = widths.old[1], widths.new, widths.head_dim
    config = model.config
    changed = {field: [getattr(config, field), new] for field, new in
               ((mlp_field(config), new_mlp), ("num_attention_heads", new_heads), ("num_key_value_heads", new_kv))
               if getattr(config, field, None) is not None and getattr(config, field) != new}
    values = {field: new for field, (_, new) in changed.items()}
    if getattr(config, "head_dim", None) is not None or new_heads != heads:
        values["head_dim"] = d  # explicit: hidden_size / num_attention_heads no longer gives it
    try:
        narrowed_config, built = narrowed(model, values)
    except UserError as e:
        raise UserError(f"width: {e}") from None
    u, hidden, prefix = units[0], model.config.hidden_size, models.layer_prefix(model, 0)
    rows = {}
    for name, _ in u.mlp_producers:
        rows[name] = rows.get(name, 0) + new_mlp
    rows[u.q[0]] = rows.get(u.q[0], 0) + new_heads * d
    for name, _ in u.kv:
        rows[name] = rows.get(name, 0) + new_kv * d
    expected = {name: (n, hidden) for name, n in rows.items()}
    expected[u.mlp_consumer] = (hidden, new_mlp)
    expected[u.attn_consumer] = (hidden, new_heads * d)
    for name, shape in expected.items():
        if built[f"{prefix}.{name}.weight"] != shape:
            raise UserError(f"width: {config.model_type} does not build these widths from a plain config ({name} would be "
                            f"{built[f'{prefix}.{name}.weight']}, needs {shape}): it derives one width from another; prune fewer kinds "
                            "of units (e.g. width:mlp=F only)")
    return narrowed_config, changed


def narrow(model: nn.Module, units: list[Units], kept: list[dict], widths: Widths) -> dict:
    """Remove the pruned units physically and set the config to the new widths; returns
    {field: [old, new]} of the config fields changed."""
    config, changed = plain_config(model, units, widths)
    d = widths.head_dim
    for layer, u, k in zip(models.decoder_layers(model), units, kept):
        for name, rows in _rows(u, k, widths).items():
            layer.set_submodule(name, _sliced(layer.get_submodule(name), rows=rows))
        layer.set_submodule(u.mlp_consumer, _sliced(layer.get_submodule(u.mlp_consumer), cols=k["mlp"]))
        layer.set_submodule(u.attn_consumer, _sliced(layer.get_submodule(u.attn_consumer), cols=[h * d + j for h in k["heads"] for j in range(d)]))
    model.config = config
    return changed


def _sliced(linear: nn.Linear, *, rows: list[int] | None = None, cols: list[int] | None = None) -> nn.Linear:
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = linear.bias
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias.data[rows] if rows is not None else bias.data)
    return out
