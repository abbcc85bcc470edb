"""Side-by-side comparison: several methods on one model, one calibration set, one evaluation set.

What `--methods` takes (also a plan file, `@FILE`, one or more specs a line, `#` comments):

    runs    spec , spec , ...
    spec    dense  |  METHOD  |  METHOD:option[:option ...]  (or ',' between the options)
    option  key=value  |  key=value|value|...   (a grid: every combination runs)

A comma starts a new run unless what follows it is `key=value` (no method before the `=`): then it
is one more option of the run before. So the plain lists of earlier versions
(`dense,wanda,thanos:alpha=0.1`) read as before, and `thanos:block_size=32|128,alpha=0|0.1` is one
grid of four runs.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import data, loading, models, plots, tasks
from .artifact import check_output, staged
from .errors import UserError
from .evaluate import perplexity
from .measure import machine, markdown_table
from .methods import METHODS, get_method
from .oneshot import Sweep
from .patterns import parse_pattern
from .progress import SILENT, Reporter
from .request import Calibration, CompressRequest, Evaluation, Execution, Output, Pruning, Tasks


@dataclass(frozen=True)
class Run:
    """One row of a comparison: 'dense', or a method with options (spec 'thanos:alpha=0.1')."""

    method: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method + "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.options.items())


def _number(value: str) -> int | float:
    """An option value: an int when written as one (block sizes, row batches), else a finite float."""
    number = int(value) if value.isdigit() else float(value)  # ValueError for anything else
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def expand_grid(spec: str) -> list[Run]:
    """The runs one method spec stands for: the cartesian product of its `|`-separated values, in
    the order written, the last option varying fastest. Bad specs fail here, before any work."""
    spec = spec.strip()

    def bad(problem: str, fix: str) -> UserError:
        return UserError(f"bad method spec '{spec}': {problem}; {fix}")

    name, *pairs = (part.strip() for part in re.split(r"[:,]", spec))
    name = name.lower()
    if name != "dense" and name not in METHODS:
        raise bad(f"unknown method '{name}'", f"choose dense, {', '.join(METHODS)}")
    if name == "dense" and pairs:
        raise bad("dense takes no options", "write dense alone")
    grid: dict[str, list] = {}
    for pair in pairs:
        key, sep, values = (part.strip() for part in pair.partition("="))
        key = key.replace("-", "_")
        if not sep or not key:
            raise bad(f"'{pair}' is not key=value" if pair else "an option is empty", "write options as key=value, e.g. thanos:alpha=0.1")
        if key in grid:
            raise bad(f"{key} is given twice", f"list its values once, e.g. {key}=1|2")
        if not values:
            raise bad(f"{key} has no value", f"write {key}=VALUE, or {key}=A|B for a grid")
        alternatives = [a.strip() for a in values.split("|")]
        if "" in alternatives:
            raise bad(f"{key}={values} has an empty value", f"separate a grid's values with single '|', e.g. {key}=1|2")
        grid[key] = []
        for value in alternatives:
            try:
                grid[key].append(_number(value))
            except ValueError:
                raise bad(f"{key}: '{value}' is not a number", f"option values are numbers, e.g. {key}=0.1") from None
    if name != "dense":
        try:
            get_method(name).check_names(grid)
        except UserError as e:
            raise UserError(f"bad method spec '{spec}': {e}") from None
    return [Run(name, dict(zip(grid, values))) for values in itertools.product(*grid.values())]


def split_specs(text: str) -> list[str]:
    """The method specs of a comma-separated list; a piece that is `key=value` continues the spec before it."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        key, eq, _ = piece.partition("=")
        if not piece:
            continue
        if eq and ":" not in key:
            if not specs:
                raise UserError(f"--methods '{text}' starts with the option '{piece}': put options after their method, e.g. thanos:{piece}")
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def plan_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of a plan file's lines that hold something once `#` comments are removed."""
    lines = [(number, line.split("#", 1)[0].strip()) for number, line in enumerate(text.splitlines(), 1)]
    return [(number, line) for number, line in lines if line]


def parse_methods(text: str) -> list[Run]:
    """Every run `--methods` asks for, grids expanded, in order; `@FILE` reads the specs from a file."""
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        if not path.is_file():
            raise UserError(f"methods file '{path}' does not exist: pass --methods @FILE with one method spec a line, or the specs themselves")
        try:
            lines = plan_lines(path.read_text())
        except UnicodeDecodeError:
            raise UserError(f"methods file '{path}' is not UTF-8 text: write one method spec a line, e.g. thanos:alpha=0|0.1") from None
        runs = []
        for number, line in lines:
            try:
                runs += [run for spec in split_specs(line) for run in expand_grid(spec)]
            except UserError as e:
                raise UserError(f"'{path}' line {number}: {e}") from None
    else:
        runs = [run for spec in split_specs(text) for run in expand_grid(spec)]
    if not runs:
        raise UserError(f"--methods '{text}' names no run: list some, e.g. dense,wanda,thanos")
    labels = [run.label for run in runs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UserError(f"--methods lists {', '.join(twice)} more than once: list each run once")
    return runs


CALIBRATION = Calibration(nsamples=64, seqlen=512)  # compare's protocol: smaller than compress's papers' default
EVALUATION = Evaluation(windows=64)


def compare(model: str, runs: list[Run], pattern, *, calibration: Calibration = CALIBRATION, evaluation: Evaluation = EVALUATION,
            execution: Execution = Execution(), targets=(), ignore=(), scored: Tasks = Tasks(), reporter: Reporter = SILENT,
            on_result=None) -> list[dict]:
    """Prune a fresh copy of `model` with every run (oneshot.Sweep: one load, one calibration set)
    and evaluate each: perplexity, and the `scored` tasks' accuracy; returns one dict per run. Every
    run is checked before any work, naming the run in a long sweep; `on_result(row)` after each run
    lets a long sweep save what it has."""
    if scored:
        tasks.check(list(scored.names))
    requests = {}
    for run in runs:
        if run.method != "dense":
            try:
                pruning = Pruning(run.method, pattern, run.options, targets, ignore)
            except UserError as e:
                raise UserError(f"run '{run.label}' at {parse_pattern(pattern)}: {e}") from None
            requests[run.label] = CompressRequest(model, pruning, calibration, Output(storage="masked"), execution)
    probe = next(iter(requests.values()), CompressRequest(model, Pruning(pattern=pattern, targets=targets, ignore=ignore), calibration,
                                                          Output(storage="masked"), execution))
    sweep = Sweep(list(requests.values()) or [probe], reporter)
    windows = data.windows(data.evaluation_tokens(evaluation.data, sweep.tokenizer), models.context_length(sweep.model, evaluation.seqlen),
                           evaluation.windows)
    device = loading.pick_device(execution.device)
    results = []
    for i, run in enumerate(runs, 1):
        reporter.step(f"run {i} of {len(runs)}: {run.label}")
        if run.method == "dense":
            row = {"label": "dense", "method": "dense", "pattern": None, "options": {}, "sparsity": 0.0, "seconds": None,
                   "prune_seconds": None, **perplexity(sweep.model, windows, device=device), **_accuracy(sweep.model, sweep.tokenizer, scored)}
        else:
            t0 = time.perf_counter()
            pruned = sweep.run(requests[run.label])
            row = {"label": run.label, "method": run.method, "pattern": str(pruned.report["pattern"]), "options": pruned.report["options"],
                   "sparsity": pruned.report["sparsity"], "seconds": round(time.perf_counter() - t0, 2),
                   "prune_seconds": pruned.report["seconds"]["prune"], **perplexity(pruned.model, windows, device=device),
                   **_accuracy(pruned.model, sweep.tokenizer, scored)}
            del pruned
        results.append(row)
        if on_result:
            on_result(row)
    return results


def _accuracy(model, tokenizer, scored: Tasks) -> dict:
    """{"tasks": ...} of a row when tasks were asked for (tasks.run), else nothing."""
    if not scored:
        return {}
    return {"tasks": tasks.run(model, tokenizer, list(scored.names), num_fewshot=scored.num_fewshot, limit=scored.limit)}


def sweep(model: str, methods: str, pattern, *, out: Path | None = None, overwrite: bool = False, command: str = "",
          calibration: Calibration = CALIBRATION, evaluation: Evaluation = EVALUATION, execution: Execution = Execution(),
          targets=(), ignore=(), scored: Tasks = Tasks(), reporter: Reporter = SILENT) -> list[dict]:
    """`compare`: the runs `methods` names (grids, @FILE), checked with the protocol and the output
    before any work, compared; with `out`, compare.json, .md and .png written there."""
    runs = parse_methods(methods)
    pattern = parse_pattern(pattern)
    if out is not None:
        check_output(out, overwrite)
    started = time.perf_counter()
    rows = compare(model, runs, pattern, calibration=calibration, evaluation=evaluation, execution=execution, targets=targets, ignore=ignore,
                   scored=scored, reporter=reporter)
    if out is not None:
        protocol = {"model": model, "pattern": str(pattern), "calib": calibration.source, "nsamples": calibration.nsamples,
                    "seqlen": calibration.seqlen, "seed": calibration.seed, "eval_data": evaluation.data, "eval_seqlen": evaluation.seqlen,
                    "eval_windows": evaluation.windows, "device": loading.pick_device(execution.device).type, "targets": list(targets),
                    "ignore": list(ignore), "tasks": list(scored.names), "limit": scored.limit, "num_fewshot": scored.num_fewshot}
        write(document(rows, protocol, command=command, seconds=time.perf_counter() - started), out, overwrite)
    return rows


def document(rows: list[dict], protocol: dict, *, command: str, seconds: float) -> dict:
    """What a sweep writes as JSON: its rows, the protocol that produced them, the machine and command."""
    return {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "protocol": protocol, "seconds": round(seconds, 1), "rows": rows}


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the comparison table, rendered by Rich on the terminal and as Markdown."""
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    columns = tasks.columns(rows)
    header = ["method", "perplexity", "× dense", *(f"{task} {metric}" for task, metric in columns), "sparsity", "pruning math s", "total s"]
    cells = [[
        r["label"],
        f"{r['perplexity']:.3f}",
        f"{r['perplexity'] / dense:.2f}" if dense else "",
        *(tasks.cell(r, task, metric) for task, metric in columns),
        f"{r['sparsity']:.3f}",
        f"{r['prune_seconds']:.1f}" if r["prune_seconds"] is not None else "",
        f"{r['seconds']:.1f}" if r["seconds"] is not None else "",
    ] for r in rows]
    return header, cells


def describe(result: dict) -> str:
    """One line: model, pattern(s), protocol, machine, date and command."""
    p, m = result["protocol"], result["machine"]
    where = m.get("gpu") or f"{m['processor']}, {m['torch_threads']} threads"
    patterns = p.get("pattern") or ", ".join(p.get("patterns", []))
    return (f"{p['model']} · {patterns} · calibration {p['nsamples']}×{p['seqlen']} {p['calib']} (seed {p['seed']}) · "
            f"evaluation {p['eval_windows']}×{p['eval_seqlen']} {p['eval_data']} · {p['device']}, {where} · "
            f"torch {m['versions'].get('torch')} · {result['date']} · `{result['command']}`")


def write(result: dict, out: Path, overwrite: bool = False) -> None:
    """compare.json, compare.md and compare.png in `out`, built in a temporary folder renamed at the end."""
    header, cells = table(result["rows"])
    with staged(out, overwrite) as tmp:
        (tmp / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "compare.md").write_text("\n".join([describe(result), "", *markdown_table(header, cells)]) + "\n")
        plots.tradeoffs(result["rows"], tmp / "compare.png", f"{result['protocol']['model']} · {result['protocol']['pattern']}")
