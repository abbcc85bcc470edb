"""`bench MODEL --plan`: the runs to build from one model on one calibration set, then benchmark.

A plan is `default` or a text file, one line per run or grid: `dense`, or a pattern and a method
spec as `compare` takes it (options after colons, grids as `thanos:alpha=0|0.1`); `#` starts a
comment. Pruned runs are stored the way that turns their zeros into savings: N:M packed,
structured shrunk, unstructured masked.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, data, models
from .compact import pack_model, shrink_model
from .compare import Run, expand_grid, plan_lines
from .driver import compress_model
from .errors import UserError
from .methods import get_method
from .patterns import NM, Structured, check_shape, parse_pattern

DEFAULT_PLAN = """\
dense
2:4             sparsegpt
2:4             thanos:alpha=0
structured:0.3  sparsegpt
structured:0.3  thanos:alpha=0
structured:0.3  thanos:alpha=0.1
"""


@dataclass(frozen=True)
class PlanRun:
    run: Run
    pattern: str | None = None  # None for dense

    @property
    def label(self) -> str:
        return "dense" if self.pattern is None else f"{self.pattern} {self.run.label}"

    @property
    def folder(self) -> str:
        return re.sub(r"[^\w.=-]+", "_", self.label)


def parse_plan(text: str, where: str = "plan") -> list[PlanRun]:
    """Runs in order, dense first (added when the plan lacks it); bad lines fail before any work."""
    runs = []
    for number, line in plan_lines(text):
        words = line.split()
        if words == ["dense"]:
            runs.append(PlanRun(Run("dense")))
            continue
        if len(words) != 2:
            raise UserError(f"{where} line {number}: '{line}' is not 'dense' or 'PATTERN METHOD[:key=value]', e.g. '2:4 thanos:alpha=0'")
        pattern, grid = parse_pattern(words[0]), expand_grid(words[1])
        if grid[0].method == "dense":
            raise UserError(f"{where} line {number}: dense takes no pattern; write it alone on its line")
        for run in grid:
            get_method(run.method).options(pattern, run.options)
            runs.append(PlanRun(run, str(pattern)))
    if not any(r.pattern for r in runs):
        raise UserError(f"{where} has no pruned run: add lines such as '2:4 thanos:alpha=0'")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise UserError(f"{where} lists a run twice: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    dense = [r for r in runs if r.pattern is None]
    return (dense or [PlanRun(Run("dense"))])[:1] + [r for r in runs if r.pattern]


def read_plan(spec: str) -> list[PlanRun]:
    if spec == "default":
        return parse_plan(DEFAULT_PLAN, "the default plan")
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"plan '{spec}' does not exist: pass --plan default or a file with one run per line")
    return parse_plan(path.read_text(), f"plan '{spec}'")


def storage_for(pattern) -> str:
    return "packed" if isinstance(pattern, NM) else "shrunk" if isinstance(pattern, Structured) else "masked"


def build(model: str, plan: list[PlanRun], workdir: Path, *, calib: str = "austen", calib_tokens: Path | None = None,
          nsamples: int = 16, seqlen: int = 256, seed: int = 0, device=None, on_run=None) -> dict[str, Path]:
    """Prune a fresh copy of `model` for every run on the same calibration tokens and save it
    compact under `workdir`; dense is the model's own folder. Returns {label: folder}."""
    base, tokenizer = models.load(model)
    if calib_tokens is not None:
        calib_ids = data.load_token_file(calib_tokens)
    else:
        limit = getattr(base.config, "max_position_embeddings", None) or seqlen
        calib_ids = data.calibration_tokens(calib, tokenizer, nsamples=nsamples, seqlen=min(seqlen, limit), seed=seed)
    data.check_tokens(calib_ids, base.config.vocab_size)
    for run in plan:
        if run.pattern:
            for i, layer in enumerate(models.decoder_layers(base)):
                for name, linear in models.linears(layer).items():
                    check_shape(parse_pattern(run.pattern), f"layers.{i}.{name}", linear.in_features)
    folders = {}
    for run in plan:
        if on_run:
            on_run(run.label)
        if run.pattern is None:
            folders[run.label] = Path(models.resolve(model))
            continue
        pattern = parse_pattern(run.pattern)
        net = copy.deepcopy(base)
        started = time.perf_counter()
        report = compress_model(net, calib_ids, method=run.run.method, pattern=pattern, device=device, **run.run.options)
        storage = storage_for(pattern)
        alpha = report["options"].get("alpha") or 0.0
        modules = shrink_model(net, alpha=alpha) if storage == "shrunk" else pack_model(net, pattern, alpha=alpha) if storage == "packed" else None
        manifest = {
            "format": "thanos-deploy/1", "storage": storage, "source_model": model,
            **{k: report[k] for k in ("method", "pattern", "options", "sparsity")},
            "calibration": {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "tokens_hash": data.token_hash(calib_ids)},
            "seconds": {**report["seconds"], "command": round(time.perf_counter() - started, 3)},
            **({"modules": modules} if modules else {}),
        }
        folders[run.label] = checkpoint.save(net, tokenizer, workdir / run.folder, manifest)
        del net
    return folders
