"""Side-by-side comparison: several methods on one model, one calibration set, one evaluation set."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from . import data, models
from .driver import compress_model
from .errors import UserError
from .evaluate import perplexity
from .methods import get_method
from .patterns import parse_pattern
from .targets import select


@dataclass(frozen=True)
class Run:
    """One row of a comparison: 'dense', or a method with options (spec 'thanos:alpha=0.1')."""

    method: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method + "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.options.items())

    @classmethod
    def parse(cls, spec: str) -> "Run":
        name, *pairs = spec.strip().split(":")
        if name != "dense":
            get_method(name)
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"bad method spec '{spec}': options are key=value, e.g. thanos:alpha=0.1")
            try:
                options[key.replace("-", "_")] = int(value) if value.isdigit() else float(value)
            except ValueError:
                raise UserError(f"bad method spec '{spec}': '{value}' is not a number") from None
        return cls(name, options)


def compare(
    model: str,
    runs: list[Run],
    pattern,
    *,
    calib: str = "austen",
    nsamples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    eval_data: str = "austen",
    eval_seqlen: int = 512,
    eval_windows: int = 64,
    device=None,
    progress: bool = False,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> list[dict]:
    """Prune a fresh copy of `model` with every run and evaluate each; returns one dict per run."""
    pattern = parse_pattern(pattern)
    for run in runs:  # reject bad options before any work
        if run.method != "dense":
            get_method(run.method).options(pattern, run.options)
    base, tokenizer = models.load(model)
    select(base, targets, ignore)  # a pattern that matches nothing fails before any work
    limit = getattr(base.config, "max_position_embeddings", None) or seqlen
    ids = data.calibration_tokens(calib, tokenizer, nsamples=nsamples, seqlen=min(seqlen, limit), seed=seed)
    windows = data.windows(data.evaluation_tokens(eval_data, tokenizer), min(eval_seqlen, limit), eval_windows)
    results = []
    for run in runs:
        if run.method == "dense":
            results.append({"label": "dense", "method": "dense", "sparsity": 0.0, "seconds": None, "prune_seconds": None,
                            **perplexity(base, windows, device=device)})
            continue
        net = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = compress_model(net, ids, method=run.method, pattern=pattern, device=device, progress=progress,
                                targets=targets, ignore=ignore, **run.options)
        seconds = time.perf_counter() - t0
        results.append({
            "label": run.label,
            "method": run.method,
            "options": report["options"],
            "sparsity": report["sparsity"],
            "seconds": round(seconds, 2),
            "prune_seconds": report["seconds"]["prune"],
            **perplexity(net, windows, device=device),
        })
        del net
    return results
