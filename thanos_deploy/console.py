"""Everything the commands show: one Rich console, the tables and the summary lines. The commands
call the library and hand its results here; nothing in this module decides or computes."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .artifact import MANIFEST, Manifest
from .progress import Bar, Reporter

console = Console()
if not console.is_terminal:
    console.width = 160  # logs and pipes: no wrapping of the tables


def table(title: str, header: list[str], rows: list[list[str]], left: tuple[str, ...] = ("candidate", "method", "what ran")) -> Table:
    """A Rich table of string cells; the columns named in `left` are left-aligned, numbers right."""
    out = Table(title=title)
    for col in header:
        out.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        out.add_row(*row)
    return out


def compress_report(report: dict, manifest: Manifest, out: Path) -> None:
    """Per decoder layer: sparsity, reconstruction errors, seconds; warnings; totals; perplexity."""
    rows = []
    for layer in (r for r in report["layers"] if r["linears"]):  # layers --targets left alone have no row
        errs = [e["relative_error"] for e in layer["linears"]]
        zeros = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for e in layer["linears"])
        size = sum(e["shape"][0] * e["shape"][1] for e in layer["linears"])
        secs = layer["seconds"]
        rows.append([str(layer["index"]), f"{zeros / size:.3f}", f"{sum(errs) / len(errs):.4f}", f"{max(errs):.4f}",
                     f"{secs['prune']:.2f}", f"{sum(secs.values()):.2f}"])
    console.print(table(f"{report['method']} {report['pattern']}", ["layer", "sparsity", "mean rel. error", "max rel. error", "prune s", "total s"], rows))
    warned = [w for layer in report["layers"] for e in layer["linears"] for w in e.get("warnings", [])]
    for w in warned[:5]:
        console.print(f"warning: {w}", style="yellow", highlight=False)
    if len(warned) > 5:
        console.print(f"warning: {len(warned) - 5} more in {MANIFEST} (layers[].linears[].warnings)", style="yellow")
    s = report["seconds"]
    console.print(
        f"sparsity {report['sparsity']:.4f} of the decoder linears · {s['total']:.1f} s "
        f"(statistics {s['statistics']:.1f}, pruning math {s['prune']:.1f}, forward {s['forward']:.1f})"
    )
    if evaluation := manifest.evaluation:
        d, p = evaluation["dense"], evaluation["pruned"]
        console.print(
            f"perplexity on {d['data']} ({d['windows']}×{d['seqlen']} tokens): dense {d['perplexity']:.3f} → "
            f"pruned {p['perplexity']:.3f} ({p['perplexity'] / d['perplexity']:.2f}×)"
        )
    plain_note(manifest)
    console.print(f"saved to {out}")


def task_results(result: dict) -> None:
    """`eval --tasks`: each task's metrics with their standard errors."""
    rows = []
    for task, metrics in result["tasks"].items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name == "samples":
                continue
            error = metrics.get(f"{name}_stderr")
            rows.append([task, name, f"{value:.4f}" + (f" ± {error:.4f}" if isinstance(error, float) else ""), str(metrics.get("samples") or "")])
    console.print(table(f"{result['model']}: lm-evaluation-harness", ["task", "metric", "value ± standard error", "items"], rows, left=("task", "metric")))


def plain_note(manifest: Manifest) -> None:
    if plain := manifest.plain:
        fields = ", ".join(f"{field} {old} → {new}" for field, (old, new) in plain.items())
        console.print(f"plain Hugging Face checkpoint: every layer narrowed alike, config {fields}; "
                      "stock transformers loads it with no code from thanos-deploy")


def inspection(result: dict, totals_only: bool = False) -> None:
    """`inspect`'s per-linear table and its totals line."""
    t = result["totals"]
    if not totals_only:
        rows = [[r["name"], "×".join(map(str, r["shape"])), r["storage"], f"{r['density']:.3f}",
                 "yes" if r["two_four"] else f"no ({r['two_four_rows']})", str(r["outlier_rows"]),
                 f"{r['flops_vs_dense']:.3f}", f"{r['bytes'] / r['dense_bytes']:.3f}"] for r in result["rows"]]
        console.print(table(f"storage: {result['storage']}", ["linear", "shape", "storage", "density", "2:4 (K)", "outlier rows",
                                                               "FLOPs vs dense", "bytes vs dense"], rows, left=("linear", "storage")))
    console.print(
        f"{t['linears']} linears · density {t['density']:.3f} · FLOPs {t['flops_vs_dense']:.3f}× dense · "
        f"{t['bytes'] / 2**20:.1f} MiB ({t['bytes'] / t['dense_bytes']:.3f}× the same weights dense) · "
        f"2:4 along K in {t['two_four_linears']}/{t['linears']} linears"
    )


def onnx_weights(path: str, rows: list[dict]) -> None:
    """`inspect model.onnx`: every constant MatMul/Gemm weight and whether it is 2:4 along K."""
    cells = [[r["node"], r["op"], r["initializer"], "×".join(map(str, r["shape"])), str(r["k_axis"]),
              "yes" if r["two_four"] else "no", f"{r['density']:.3f}", str(r["bytes"])] for r in rows]
    header = ["node", "op", "initializer", "shape", "K axis", "2:4 along K", "density", "bytes"]
    console.print(table(f"{path}: MatMul/Gemm weights, 2:4 along K (TensorRT's rule)", header, cells, left=tuple(header)))
    console.print(f"{sum(r['two_four'] for r in rows)} of {len(rows)} weights are 2:4 along K · {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB")


def export(report: dict, out: Path) -> None:
    console.print(f"exported with the {report['exporter']} exporter in {report['export_seconds']:.1f} s"
                  + (f" ({report['fallback_reason']})" if report["fallback_reason"] else ""))
    for c in report["verification"]["checks"]:
        console.print(f"  ORT vs PyTorch, batch {c['batch']} seq {c['seq']} past {c['past']}: max abs diff logits "
                      f"{c['max_abs_logits']:.2e}, present {c['max_abs_present']:.2e}")
    t = report["two_four"]
    console.print(f"  2:4 along K (TensorRT's rule): {t['two_four_along_k']} of {t['weights']} MatMul/Gemm weights")
    console.print(f"saved to {out}")


def gguf(report: dict) -> None:
    """`export gguf`: the file, what the tools kept at another type, the check against the artifact."""
    check = report["check"]
    console.print(f"wrote {report['out']} ({report['type']}, {report['bytes'] / 2**20:.1f} MiB) in {report['seconds']:.0f} s with llama.cpp's "
                  f"converter{' and quantiser' if any(k['by'] == 'llama-quantize' for k in report['kept']) or report['type'] not in ('f32', 'f16', 'bf16', 'q8_0') else ''}",
                  highlight=False)
    for kept in report["kept"][:8]:
        why = f" (rows of {kept['row']} are not a multiple of {kept['needs_multiple_of']})" if "needs_multiple_of" in kept else ""
        console.print(f"  kept at {kept['type']} by the {kept['by']}: {kept['tensor']}{why}", highlight=False)
    if len(report["kept"]) > 8:
        console.print(f"  … and {len(report['kept']) - 8} more tensors at another type", highlight=False)
    change = check["perplexity_change"]
    console.print(f"  read back against the artifact on {check['windows']}×{check['seqlen']} tokens: max |logit difference| "
                  f"{check['max_abs_logit_difference']:.2e}, perplexity {check['perplexity_artifact']:.3f} → {check['perplexity_gguf']:.3f}"
                  + (f" ({100 * change:+.2f} %)" if change is not None else ""), highlight=False)


def engine(report: dict, out: Path) -> None:
    s = report["sparsity"]
    console.print(f"engine saved to {out} (TensorRT {report['tensorrt']})")
    console.print(f"sparse math: {len(s['eligible'])} layers eligible, {len(s['picked_sparse'])} picked a sparse tactic")
    console.print(f"equivalent: {report['trtexec']}")


def generation(result: dict, backend: str) -> None:
    console.print(result["prompt"], style="bold", end="")
    console.print(result["text"], highlight=False)
    console.print(f"[{backend}] {result['tokens']} tokens in {result['seconds']:.2f} s", style="dim")


def warning(line: str) -> None:
    console.print(f"warning: {line}", style="yellow", highlight=False)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class RichReporter(Reporter):
    """The Reporter the commands pass down to the library: spinners, bars and lines on the console.
    Use it as a context manager: what is still on screen when the work ends (or fails) goes."""

    def __init__(self):
        self._progress, self._task = None, None

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def status(self, message: str):
        return console.status(message)

    def say(self, line: str) -> None:
        console.print(line, highlight=False)

    def warn(self, line: str) -> None:
        warning(line)

    def step(self, message: str) -> None:
        self._line().update(self._task, description=message)
        if not console.is_terminal:
            console.print(message, style="dim", highlight=False)

    @contextmanager
    def bar(self, description: str, total: int | None = None):
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            yield _RichBar(progress, progress.add_task(description, total=total))

    def record(self, kind: str, values: dict) -> None:
        if kind == "recover.step":
            r = values
            info = (f"KL {r['kl']:.4f}" + (f" · CE {r['ce']:.3f}" if r["ce"] is not None else "") + f" · {r['tokens_per_s']:.0f} tok/s "
                    f"({100 * r['matmul_fraction']:.0f}% of matmul rate) · {_duration(r['seconds_left'])} left")
            self._line().update(self._task, description=f"recover {r['step']}/{r['steps'] or '?'} · {info}")
            if not console.is_terminal:
                console.print(f"step {r['step']}: {info}", style="dim", highlight=False)
        elif kind == "recover.plan":
            console.print(plan_line(values), style="dim", highlight=False)
        elif kind == "recover.evaluation":
            accuracy = "".join(f" · {task} {metrics['acc']:.3f}" for task, metrics in (values.get("tasks") or {}).items() if "acc" in metrics)
            console.print(f"{values['tokens']:>9,} tokens · {values['seconds']:6.0f} s · perplexity {values['perplexity']:.3f}{accuracy}", highlight=False)

    def _line(self) -> Progress:
        """One transient line for steps and training progress, started when first needed."""
        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("", total=None)
        return self._progress


class _RichBar(Bar):
    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(self.task, steps)

    def update(self, completed: int | None = None, *, total: int | None = None) -> None:
        self.progress.update(self.task, completed=completed, total=total)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)


def plan_line(plan: dict) -> str:
    """recover's memory plan in one line: the total per process against the device, and its parts."""
    s, gb = plan["setting"], 1e9
    room = f" of {plan['capacity'] / gb:.1f}" if plan["capacity"] else ""
    parts = ", ".join(f"{k} {v / gb:.2f}" for k, v in plan["device"].items())
    host = f"; host memory {sum(plan['host'].values()) / gb:.1f} GB" if plan["host"] else ""
    return f"memory plan per process ({s['processes']} on {s['device']}): {plan['total'] / gb:.1f}{room} GB ({parts} GB){host}"


def memory_plan(plan: dict) -> None:
    """`recover --plan-only`: the plan per process as a table, and whether it fits."""
    s, gb = plan["setting"], 1e9
    rows = [[k, f"{v / gb:.2f}", ""] for k, v in plan["device"].items()] + [[k, "", f"{v / gb:.2f}"] for k, v in plan["host"].items()]
    rows.append(["total", f"{plan['total'] / gb:.2f}", f"{sum(plan['host'].values()) / gb:.2f}" if plan["host"] else ""])
    title = (f"memory per process: {s['processes']} process(es) on {s['device']}, batch {s['batch_size']} × {s['seqlen']}"
             + (", gradient checkpointing" if s["gradient_checkpointing"] else "") + (", CPU offload" if s["cpu_offload"] else ""))
    console.print(table(title, ["part", "device GB", "host GB"], rows, left=("part",)))
    if plan["capacity"]:
        verdict = "fits" if plan["fits"] else "does not fit"
        console.print(f"{verdict}: {plan['total'] / gb:.1f} GB of {plan['capacity'] / gb:.1f} GB per device (the plan may use 90 %)"
                      + (f"; it fits with {' or '.join(plan['fixes'])}" if plan["fixes"] else ""), highlight=False)


def recovery_report(result: dict, out: Path) -> None:
    log = result["log"]
    start, end = log[0]["perplexity"], log[-1]["perplexity"]
    console.print(f"perplexity {start:.3f} → {end:.3f} after {result['tokens']:,} tokens ({result['steps']} steps, {result['world']} "
                  f"process{'es' if result['world'] > 1 else ''}) in {_duration(result['seconds'])}; {result['tokens_per_s']:.0f} tokens/s, "
                  f"{100 * result['matmul_fraction']:.0f}% of this machine's {result['matmul_rate'] / 1e9:.0f} GFLOP/s float32 matmul rate", highlight=False)
    if shards := result.get("shard_bytes"):
        console.print(f"held by each process (its shards): parameters {shards['parameters'] / 1e6:.1f} MB, gradients {shards['gradients'] / 1e6:.1f} MB, "
                      f"optimizer states {shards['optimizer'] / 1e6:.1f} MB", highlight=False)
    console.print(f"saved to {out} (recovery.json, recovery.png)")
