"""The pruning methods. Each is one module with a pure function

    prune(weight [out, in], stats, pattern, **options) -> new weight

that trusts its options (request.Pruning resolves and checks them once, through `Method.options`),
and is registered here. A new method is one new file and one entry in METHODS; a new option is
one keyword of its `prune` and one line in OPTION_HELP.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from . import activation, magnitude, sparsegpt, thanos, wanda

OPTION_HELP = {  # every option any method takes: the command line shows these
    "alpha": "Thanos: fraction of outlier rows kept dense (N:M and structured; default 0.1 for structured, else 0)",
    "block_size": "Thanos/SparseGPT: columns per block (default 512 / 128)",
    "row_batch": "Thanos: rows solved per batched call (memory knob; default 256)",
    "percdamp": "Thanos/SparseGPT: Hessian damping, relative to mean(diag H) (default 0.01)",
}


@dataclass(frozen=True)
class Method:
    name: str
    prune: Callable
    column_score: Callable  # column_score(weight, stats) -> [in]: how much each input column matters (width patterns pick units by it)
    needs_hessian: bool = False
    check: Callable | None = None  # check(pattern, options): a bad value or combination is a UserError
    pattern_defaults: Callable | None = None  # pattern_defaults(pattern) -> the defaults that depend on the pattern

    @property
    def defaults(self) -> dict:
        """Options the method takes, with their default values (the keywords of its `prune`)."""
        params = list(inspect.signature(self.prune).parameters.values())[3:]
        return {p.name: p.default for p in params}

    def check_names(self, names) -> None:
        """Unknown option names are a UserError naming the ones the method takes (no pattern needed)."""
        unknown = sorted(k for k in names if k not in self.defaults)
        if unknown:
            takes = ", ".join(self.defaults) or "no options"
            raise UserError(f"method '{self.name}' does not take option(s) {', '.join(unknown)}; it takes {takes}")

    def options(self, pattern, given: dict) -> dict:
        """The full option set for `pattern`: the defaults (those of the pattern first), overridden
        by `given` (None = not given), checked."""
        self.check_names(k for k, v in given.items() if v is not None)
        defaults = {**self.defaults, **(self.pattern_defaults(pattern) if self.pattern_defaults else {})}
        options = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        if self.check:
            self.check(pattern, options)
        return options


METHODS: dict[str, Method] = {
    "thanos": Method("thanos", thanos.prune, thanos.column_score, needs_hessian=True, check=thanos.check, pattern_defaults=thanos.pattern_defaults),
    "sparsegpt": Method("sparsegpt", sparsegpt.prune, sparsegpt.column_score, needs_hessian=True, check=sparsegpt.check),
    "wanda": Method("wanda", wanda.prune, wanda.column_score),
    "magnitude": Method("magnitude", magnitude.prune, magnitude.column_score),
    "activation": Method("activation", activation.prune, activation.column_score, check=activation.check),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None
