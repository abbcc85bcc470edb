"""Which linears to prune: module-name patterns with llm-compressor's convention.

A pattern `re:EXPR` is a regular expression matched (re.match) against the full module name,
e.g. `re:.*self_attn\\..*`; any other pattern is an exact full name or a suffix of whole name
components, e.g. `down_proj`, `mlp.down_proj` or `model.layers.3.mlp.down_proj`. The default
targets are every linear of every decoder layer; `ignore` removes linears from them. A pattern
that matches no linear of any decoder layer is an error (a typo would otherwise prune
everything, or nothing).
"""

from __future__ import annotations

import re

from torch import nn

from . import models
from .errors import UserError
from .patterns import check_shape


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def check_patterns(patterns, flag: str) -> None:
    """Each pattern is a name or a valid re:REGEX (checked once, when a request is built)."""
    for pattern in patterns:
        if not pattern.strip():
            raise UserError(f"{flag}: an empty pattern; pass a module name, a suffix such as down_proj, or re:REGEX")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise UserError(f"{flag} '{pattern}' is not a valid regular expression ({e})") from None


def select(model: nn.Module, pruning) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, the linears `pruning` (request.Pruning) prunes, names relative to the
    layer, in layer order; each of them is checked to fit its pattern (before any work)."""
    targets, ignore, pattern = pruning.targets, pruning.ignore, pruning.pattern
    used: set[str] = set()
    chosen = []
    for i, layer in enumerate(models.decoder_layers(model)):
        prefix = models.layer_prefix(model, i)
        picked = {}
        for name, linear in models.linears(layer).items():
            full = f"{prefix}.{name}"
            hit_target = [p for p in targets if matches(p, full)]
            hit_ignore = [p for p in ignore if matches(p, full)]
            used.update(hit_target, hit_ignore)
            if (hit_target or not targets) and not hit_ignore:
                check_shape(pattern, f"layers.{i}.{name}", linear.in_features)
                picked[name] = linear
        chosen.append(picked)
    for flag, patterns in (("--targets", targets), ("--ignore", ignore)):
        unused = [p for p in patterns if p not in used]
        if unused:
            example = next(iter(models.linears(models.decoder_layers(model)[0])), "")
            raise UserError(
                f"{flag} {', '.join(repr(p) for p in unused)} matches no linear of the decoder layers "
                f"(names look like '{models.layer_prefix(model, 0)}.{example}'); fix the pattern"
            )
    if not any(chosen):
        raise UserError("--targets and --ignore leave no linear to prune: ignore fewer modules")
    return chosen
