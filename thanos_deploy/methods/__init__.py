"""The pruning methods. Each is one module with a pure function

    prune(weight [out, in], stats, pattern, **options) -> new weight

and is registered here with its options and their defaults. A new method is one new file and one
entry in METHODS.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from . import activation, magnitude, sparsegpt, thanos, wanda


@dataclass(frozen=True)
class Method:
    name: str
    prune: Callable
    column_score: Callable  # column_score(weight, stats) -> [in]: how much each input column matters (width patterns pick units by it)
    needs_hessian: bool = False
    configure: Callable | None = None  # configure(pattern, options) -> options: checks, pattern-dependent defaults

    @property
    def defaults(self) -> dict:
        """Options the method takes, with their default values."""
        params = list(inspect.signature(self.prune).parameters.values())[3:]
        return {p.name: p.default for p in params}

    def check_names(self, names) -> None:
        """Unknown option names are a UserError naming the ones the method takes (no pattern needed)."""
        unknown = sorted(k for k in names if k not in self.defaults)
        if unknown:
            takes = ", ".join(self.defaults) or "no options"
            raise UserError(f"method '{self.name}' does not take option(s) {', '.join(unknown)}; it takes {takes}")

    def options(self, pattern, given: dict) -> dict:
        """The full option set for `pattern`: defaults overridden by `given` (None = not given).

        Unknown names and bad values are a UserError, raised before any work is done.
        """
        self.check_names(k for k, v in given.items() if v is not None)
        options = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        return self.configure(pattern, options) if self.configure else options


METHODS: dict[str, Method] = {
    "thanos": Method("thanos", thanos.prune, thanos.column_score, needs_hessian=True, configure=thanos.configure),
    "sparsegpt": Method("sparsegpt", sparsegpt.prune, sparsegpt.column_score, needs_hessian=True, configure=sparsegpt.configure),
    "wanda": Method("wanda", wanda.prune, wanda.column_score),
    "magnitude": Method("magnitude", magnitude.prune, magnitude.column_score),
    "activation": Method("activation", activation.prune, activation.column_score, configure=activation.configure),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None
