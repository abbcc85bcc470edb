"""`bench MODEL --plan`: the runs to build from one model on one calibration set, then benchmark.

A plan is `default` or a text file, one line per run or grid: `dense`, or a pattern and a method
spec as `compare` takes it (options after colons, grids as `thanos:alpha=0|0.1`); `#` starts a
comment. Pruned runs are stored the way that turns their zeros into savings: N:M packed,
structured shrunk, unstructured masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import loading
from ..compare import Run, expand_grid, plan_lines
from ..errors import UserError
from ..oneshot import Sweep
from ..patterns import parse_pattern
from ..progress import SILENT, Reporter
from ..request import Calibration, CompressRequest, Execution, Output, Pruning

DEFAULT_PLAN = """\
dense
2:4             sparsegpt
2:4             thanos:alpha=0
structured:0.3  sparsegpt
structured:0.3  thanos:alpha=0
structured:0.3  thanos:alpha=0.1
width:mlp=0.32,heads=0.33  thanos
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
            Pruning(run.method, pattern, run.options)  # a bad option fails here, naming its line
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


def build(model: str, plan: list[PlanRun], workdir: Path, calibration: Calibration, execution: Execution, reporter: Reporter = SILENT) -> dict[str, Path]:
    """Prune a fresh copy of `model` for every run of `plan` on the same calibration windows
    (oneshot.Sweep) and save it compact under `workdir` (storage auto: N:M packed, structured
    shrunk, width plain); dense is the model's own folder. Returns {label: folder}."""
    requests = {run.label: CompressRequest(model, Pruning(run.run.method, run.pattern, run.run.options), calibration,
                                           Output(workdir / run.folder, storage="auto"), execution) for run in plan if run.pattern}
    sweep = Sweep(list(requests.values()), reporter)
    folders = {}
    for run in plan:
        reporter.step(f"pruning {run.label}")
        folders[run.label] = Path(loading.resolve(model)) if run.pattern is None else sweep.run(requests[run.label]).out
    return folders
