"""The `thanos-deploy` command line: each command parses its options, calls the library (the same
functions the Python API offers) and hands the result to console.py to show. No decisions here.

The options of the request parts (request.py: Pruning, Calibration, Output, Execution, Evaluation,
Training, Teacher) are built from their fields by `takes`: each flag, default and help text is the
field's own, written once."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import shlex
import sys
import time
import typing
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Optional

import click
import transformers
import typer

from . import console as show
from .bench import run as bench_run
from .bench.report import describe as describe_bench
from .bench.report import tables as bench_tables
from .compare import CALIBRATION as COMPARE_CALIBRATION
from .compare import EVALUATION as COMPARE_EVALUATION
from .compare import sweep
from .compare import table as compare_table
from .console import RichReporter, console, table
from .errors import PeerLost, UserError
from . import llamacpp_build as llamacpp
from .exporters.gguf import QUANTIZER_TYPES as GGUF_QUANTIZED, export_gguf
from .exporters.onnx import export_checkpoint
from .exporters.sparsity import check_file as onnx_weights
from .exporters.tensorrt import build_engine_from
from .inspection import inspect_checkpoint, inspect_model
from .loading import SMOLLM2_ALIAS
from .methods import METHODS, OPTION_HELP
from .oneshot import convert, default_out, oneshot
from .pipeline import distributed
from .progress import SILENT
from .recovery import plan_only as recovery_plan
from .recovery import recover
from .recovery.plan import parse_size
from .request import (RECOVER_EVALUATION, Calibration, CompressRequest, Evaluation, Execution, Memory, Output, Pruning, RecoverRequest, Tasks,
                      Teacher, Training, flag_of, keyword_of, options_of, storage_from_flags)
from .runtime import generate
from .scores import evaluate_model, evaluate_tasks

try:  # Typer >= 0.2x runs on its own vendored click, whose exception classes are not click's
    from typer._click import exceptions as vendored_click
except ImportError:
    vendored_click = None

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help shows patterns literally: Rich would read `N:M:` as an emoji code
    help="Prune LLMs with Thanos, SparseGPT, Wanda or magnitude; evaluate, save and ship them.",
)


@dataclass(frozen=True)
class Part:
    """A request part a command takes: `cls`'s option fields (`only` some of them), defaulting to
    `defaults` (an instance with the command's own defaults) or, `preset`, to None: the library then
    decides, and the command receives only what was given, as a dict."""

    name: str
    cls: type
    defaults: object = None
    only: tuple[str, ...] | None = None
    preset: str = ""  # what decides unset values, for the help text

    def fields(self):
        return [f for f in options_of(self.cls) if self.only is None or f.name in self.only]

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in self.fields():
            default = None if self.preset else getattr(self.defaults, f.name) if self.defaults is not None else f.default
            help = f.metadata["help"] + (f" (default: {self.preset})" if self.preset else "")
            decls = [flag_of(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
            kind = _cli_type(hints[f.name], default)
            value = list(default) if isinstance(default, tuple) and default else None if isinstance(default, tuple) else default
            out.append(inspect.Parameter(keyword_of(f), inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                         default=typer.Option(value, *decls, help=help)))
        return out

    def build(self, given: dict):
        values = {f.name: given.pop(keyword_of(f)) for f in self.fields()}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        if self.preset:
            return {k: v for k, v in values.items() if v is not None}
        return replace(self.defaults, **values) if self.defaults is not None else self.cls(**values)


def _cli_type(hint, default):
    """The type Typer parses a field as: X | None and tuples of strings become Optional options."""
    if typing.get_origin(hint) is tuple:
        return Optional[list[str]]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = next((a for a in args if a in (str, int, float, bool, Path)), args[0]) if args else hint
    return Optional[base] if default is None or type(None) in typing.get_args(hint) else base


def takes(*parts: Part, extra: tuple[inspect.Parameter, ...] = ()):
    """Give the command an option for every field of each part (and the `extra` ones); it is called
    with the built parts as keyword arguments named after them (extras in `extra=` as a dict)."""
    def wrap(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.name not in {part.name for part in parts} | {"extra"}]
        params = own + [p for part in parts for p in part.parameters()] + list(extra)

        @functools.wraps(fn)
        def command(**given):
            built = {part.name: part.build(given) for part in parts}
            if extra:
                built["extra"] = {p.name: given.pop(p.name) for p in extra}
            return fn(**given, **built)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer reads this signature, not the wrapped function's
        return command
    return wrap


def _option(name: str, kind, default, help: str, flag: str | None = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                             default=typer.Option(default, flag or "--" + name.replace("_", "-"), help=help))


METHOD_OPTIONS = tuple(_option(name, Optional[type(next(m.defaults[name] for m in METHODS.values() if name in m.defaults))], None, help)
                       for name, help in OPTION_HELP.items())
STORAGE_FLAGS = (_option("shrink", bool, False, "structured: remove the pruned columns physically"),
                 _option("pack", bool, False, "N:M: store the pattern rows packed (values + 2-bit positions for 2:4)"))


def _show_version(value: bool) -> None:
    if value:
        print(f"thanos-deploy {metadata.version('thanos-deploy')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit"),
):
    """Options before any command (the app's help text is set on the Typer object)."""


def _command_line() -> str:
    return "thanos-deploy " + shlex.join(sys.argv[1:])


@app.command()
@takes(Part("pruning", Pruning), Part("calibration", Calibration), Part("output", Output), Part("execution", Execution),
       Part("evaluation", Evaluation), extra=METHOD_OPTIONS + STORAGE_FLAGS)
def compress(model: str = typer.Argument(SMOLLM2_ALIAS, help="HF folder, hub id, .gguf file, or smollm2-135m"), *, pruning, calibration,
             output, execution, evaluation, extra):
    """Prune MODEL layer by layer and save it as a Hugging Face folder with thanos_deploy.json."""
    if execution.processes != 1:
        raise typer.Exit(distributed.launch(execution.processes, sys.argv[1:]))
    pruning = replace(pruning, options={name: extra[name] for name in OPTION_HELP})
    output = replace(output, storage=storage_from_flags(extra["shrink"], extra["pack"]))
    if output.out is None:
        output = replace(output, out=default_out(model, pruning.method.name, str(pruning.pattern)))
    request = CompressRequest(model, pruning, calibration, output, execution, evaluation)
    with RichReporter() as reporter:
        result = oneshot(request, reporter=reporter)
    if result.process != 0:
        return  # process 0 reports
    show.compress_report(result.report, result.manifest, request.output.out)
    if result.manifest.storage != "masked":
        show.inspection(inspect_model(result.model, result.manifest), totals_only=True)


def _converter(storage: str, what: str, doc: str):
    @takes(Part("output", Output, only=("out", "save_dtype", "overwrite")))
    def command(model: str = typer.Argument(..., help=f"A masked checkpoint pruned with {what} pattern"),
                pattern: Optional[str] = typer.Option(None, help="The pattern, when the folder has no thanos_deploy.json"), *, output):
        if output.out is None:
            raise UserError(f"{storage} writes a new folder: pass --out")
        result = convert(model, replace(output, storage=storage), pattern)
        show.inspection(inspect_model(result.model, result.manifest), totals_only=True)
        show.plain_note(result.manifest)
        console.print(f"saved to {output.out}")

    command.__doc__ = doc
    return command


app.command("shrink")(_converter("shrunk", "a structured", "Remove structured-pruned columns physically (and narrow MLPs without outlier rows)."))
app.command("pack")(_converter("packed", "an N:M", "Store N:M weights packed: kept values plus their positions (2 bits each for 2:4)."))


METHODS_HELP = ("Runs, comma-separated: dense, or a method with options after ':' (thanos:alpha=0.1; several options "
                "separated by ':' or ','). '|' makes a grid of every combination: thanos:block_size=32|128|512,alpha=0|0.05|0.1 "
                "is 9 runs (a comma followed by key=value continues the run before it). @FILE reads the specs from a file, "
                "one or more a line, '#' comments")


@app.command("compare")
@takes(Part("pruning", Pruning, only=("pattern", "targets", "ignore")), Part("calibration", Calibration, COMPARE_CALIBRATION),
       Part("evaluation", Evaluation, COMPARE_EVALUATION), Part("scored", Tasks), Part("execution", Execution, only=("device",)),
       Part("output", Output, only=("out", "overwrite")))
def compare_cmd(model: str = typer.Argument(..., help="HF folder, hub id, .gguf file, or smollm2-135m"),
                methods: str = typer.Option("dense,wanda,sparsegpt,thanos", help=METHODS_HELP),
                as_json: bool = typer.Option(False, "--json", help="Print the results as JSON"), *, pruning, calibration, evaluation,
                scored, execution, output):
    """Prune MODEL with several methods (or a grid of options) on the same data and print their perplexity side by side."""
    with SILENT if as_json else RichReporter() as reporter:
        rows = sweep(model, methods, pruning.pattern, out=output.out, overwrite=output.overwrite, command=_command_line(),
                     calibration=calibration, evaluation=evaluation, execution=execution, targets=pruning.targets, ignore=pruning.ignore,
                     scored=scored, reporter=reporter)
    if as_json:
        print(json.dumps(rows))
        return
    console.print(table(f"{model} · {pruning.pattern} · calibration {calibration.nsamples}×{calibration.seqlen} {calibration.source}",
                        *compare_table(rows)))
    if output.out is not None:
        console.print(f"wrote compare.json, compare.md and compare.png to {output.out}")


@app.command("recover")
@takes(Part("output", Output, only=("out", "overwrite", "resume")), Part("teacher", Teacher), Part("training", Training),
       Part("evaluation", Evaluation, RECOVER_EVALUATION), Part("scored", Tasks), Part("execution", Execution, only=("device", "processes")),
       Part("memory", Memory))
def recover_cmd(pruned: str = typer.Argument(..., help="A pruned artifact written by compress: masked, packed, shrunk or width-pruned plain"),
                plan_only: bool = typer.Option(False, help="Print the memory plan per process and stop: nothing is loaded but the configs"),
                device_memory: Optional[str] = typer.Option(None, help="--plan-only: plan for GPUs with this much memory each (e.g. 80GB); "
                                                            "default: this machine"),
                as_json: bool = typer.Option(False, "--json", help="--plan-only: print the plan as JSON"),
                *, output, teacher, training, evaluation, scored, execution, memory):
    """Win back quality: distil the dense model into a pruned one, every pruned weight kept pruned."""
    if plan_only:
        made = recovery_plan(pruned, teacher, training, memory, processes=execution.processes,
                             device_memory=parse_size(device_memory) if device_memory else None).as_dict()
        if as_json:
            print(json.dumps(made))
        else:
            show.memory_plan(made)
        return
    if execution.processes != 1:
        raise typer.Exit(distributed.launch(execution.processes, sys.argv[1:]))
    request = RecoverRequest(pruned, output, teacher, training, evaluation, execution.device, memory, scored)
    with RichReporter() as reporter:
        result = recover(request, reporter)
    if result["matmul_rate"]:  # process 0 (the others of a torchrun job have nothing to report)
        show.recovery_report(result, output.out)


@app.command("eval")
@takes(Part("chosen", Tasks))
def eval_cmd(
    model: str = typer.Argument(..., help="HF folder, hub id, .gguf file, smollm2-135m, or a pruned checkpoint"),
    data_source: str = typer.Option(Evaluation.data, "--data", help="austen, wikitext2, c4, or a .txt/.jsonl file"),
    seqlen: int = typer.Option(Evaluation.seqlen, help="Tokens per window"),
    max_windows: int = typer.Option(0, help="Evaluate at most this many windows (0: all)"),
    device: str = typer.Option(Execution.device, help="auto (CUDA when present), cpu or cuda"),
    dtype: str = typer.Option(Execution.dtype, help="auto, float32, float16 or bfloat16"),
    offload: Optional[bool] = typer.Option(None, "--offload/--no-offload", help="Read one decoder layer at a time from disk "
                                           "(default: when the model would not fit in memory)"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
    *, chosen,
):
    """Perplexity over non-overlapping windows (exp of the mean next-token cross-entropy), or with
    --tasks the accuracy of lm-evaluation-harness tasks."""
    if chosen:
        with SILENT if as_json else RichReporter() as reporter, reporter.status(f"running {', '.join(chosen.names)} on {model}"):
            result = evaluate_tasks(model, chosen, device=device, dtype=dtype)
        if as_json:
            print(json.dumps(result))
        else:
            show.task_results(result)
        return
    result = evaluate_model(model, data_source, seqlen, max_windows, device=device, dtype=dtype, offload=offload)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"{model}: perplexity {result['perplexity']:.3f} on {data_source} ({result['windows']} windows × {result['seqlen']} tokens)")


QUICK, FULL = "16×256 with --quick, else 64×512 tokens", "8×256 with --quick, else 32×512 tokens"


@app.command("bench")
@takes(Part("execution", Execution, Execution(device="cpu"), only=("device", "dtype")),
       Part("calibration", Calibration, preset=f"--plan's calibration: {QUICK}"), Part("evaluation", Evaluation, preset=f"perplexity: {FULL}; 0 skips it"),
       Part("accuracy", Tasks), Part("output", Output, only=("out", "overwrite")))
def bench_cmd(
    dense: str = typer.Argument(..., help="The dense model (checkpoint, ONNX folder, plan, .gguf, smollm2-135m); with --plan, the model to prune"),
    candidates: Optional[list[str]] = typer.Argument(None, help="Artifacts to compare: checkpoints (masked, shrunk, packed), ONNX folders, .plan or .gguf files"),
    plan: Optional[str] = typer.Option(None, help="Build the candidates from DENSE: 'default' or a file with one 'PATTERN METHOD[:k=v]' per line"),
    backend: Optional[list[str]] = typer.Option(None, help="torch, ort, tensorrt or llamacpp; repeat for several (default: each artifact's own)"),
    batch_sizes: Optional[str] = typer.Option(None, help="Comma-separated batch sizes (default for the device)"),
    prompt_lengths: Optional[str] = typer.Option(None, help="Comma-separated prompt lengths (default for the device)"),
    decode_tokens: Optional[int] = typer.Option(None, help="Decode steps timed per repetition"),
    reps: Optional[int] = typer.Option(None, help="Interleaved repetitions after warm-up"),
    quick: bool = typer.Option(False, help="Small grid, few repetitions, small calibration and evaluation sets"),
    peak_memory: bool = typer.Option(True, "--peak-memory/--no-peak-memory", help="Measure each candidate's peak memory in a fresh process"),
    *, execution, calibration, evaluation, accuracy, output,
):
    """Latency and throughput of compressed models against dense: prefill, decode, p50/p90/p99, speed-ups with intervals, plots."""
    out = output.out or Path(time.strftime("bench-%Y%m%d-%H%M%S"))
    grid = {"batch_sizes": _ints(batch_sizes, "--batch-sizes"), "prompt_lengths": _ints(prompt_lengths, "--prompt-lengths"),
            "decode_tokens": decode_tokens, "repetitions": reps}
    with RichReporter() as reporter:
        result = bench_run.bench(dense, candidates or [], out, plan=plan, backends=backend, execution=execution, quick=quick,
                                 grid={k: v for k, v in grid.items() if v not in (None, ())}, calibration=calibration, evaluation=evaluation,
                                 accuracy=accuracy, peak_memory=peak_memory, overwrite=output.overwrite, command=_command_line(), reporter=reporter)
    console.print(describe_bench(result), highlight=False)
    for title, header, rows in bench_tables(result):
        console.print(table(title, header, rows))
    console.print(f"wrote bench.json, bench.md, latency.png and pareto.png to {out} in {result['seconds']:.0f} s")


def _ints(text: Optional[str], option: str) -> tuple[int, ...]:
    """A comma-separated list of integers from the command line."""
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, e.g. 1,4, not '{text}'") from None


export_app = typer.Typer(no_args_is_help=True, help="Export a checkpoint to a deployment format.")
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx_cmd(
    model: str = typer.Argument(..., help="Any checkpoint thanos_deploy.load accepts (dense, masked, packed, shrunk)"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write model.onnx, config, tokenizer and export_report.json to"),
    dtype: str = typer.Option("fp32", help="fp32 or fp16 (a real fp16 graph)"),
    past: bool = typer.Option(True, "--past/--no-past", help="With KV cache inputs/outputs (default) or logits only"),
    exporter: str = typer.Option("auto", help="auto (dynamo, then legacy), dynamo or legacy"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
):
    """Export to ONNX (Optimum names, dynamic batch/sequence/past), then verify against PyTorch with ONNX Runtime."""
    with console.status("exporting and verifying (a minute for SmolLM2)"):
        report = export_checkpoint(model, out, dtype=dtype, with_past=past, exporter=exporter, overwrite=overwrite)
    show.export(report, out)


@export_app.command("gguf")
def export_gguf_cmd(
    model: str = typer.Argument(..., help="An artifact with a plain architecture: dense, masked, width-pruned (plain) or recovered"),
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file to write"),
    kind: str = typer.Option("f16", "--type", help=f"f32, f16, bf16 or q8_0 (llama.cpp's converter), or {', '.join(GGUF_QUANTIZED)} (its quantiser)"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
):
    """Export to GGUF with llama.cpp's own converter and quantiser, for llama.cpp, Ollama and LM Studio; checked against the artifact."""
    with console.status(f"converting {model} to GGUF {kind} and checking it"):
        report = export_gguf(model, out, kind=kind, overwrite=overwrite)
    show.gguf(report)


setup_app = typer.Typer(no_args_is_help=True, help="Fetch and build the tools some commands use, once, into the cache.")
app.add_typer(setup_app, name="setup")


@setup_app.command("llama.cpp")
def setup_llama_cpp_cmd(build: bool = typer.Option(True, "--build/--no-build", help="Also build llama.cpp's library, llama-quantize, "
                                                   "llama-bench and llama-perplexity (about 11 minutes on 2 cores); --no-build: the converter only")):
    """llama.cpp's converter, tools and library from the pinned llama-cpp-python sources (export gguf, --backend llamacpp)."""
    with console.status("fetching llama.cpp's sources"):
        tree = llamacpp.fetch()
    console.print(f"llama.cpp sources ({llamacpp.PACKAGE} {llamacpp.VERSION}) in {tree}")
    if build:
        with console.status("building llama.cpp's tools (about 11 minutes on 2 cores)"):
            tools = llamacpp.build()
        console.print(f"llama.cpp's tools in {tools}")


@app.command("build-engine")
def build_engine_cmd(
    onnx_path: Path = typer.Argument(..., help="model.onnx or an exported folder"),
    out: Path = typer.Option(..., "--out", "-o", help="Engine file (.plan); a .json report and timing cache go next to it"),
    sparse: bool = typer.Option(True, "--sparse/--dense", help="Enable 2:4 sparse weights (SPARSE_WEIGHTS)"),
    shapes: Optional[str] = typer.Option(None, help="Profile ranges: batch=1:1:4,seq=1:128:512,past=0:128:1024"),
    workspace_mib: int = typer.Option(4096, help="Builder workspace limit in MiB"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
):
    """Build a TensorRT engine (needs an NVIDIA GPU and TensorRT) and report which layers went sparse."""
    report = build_engine_from(onnx_path, out, sparse=sparse, shapes=shapes, workspace_mib=workspace_mib, overwrite=overwrite)
    show.engine(report, out)


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="A checkpoint (torch), an exported folder or .onnx (ort), a .plan (tensorrt) or a .gguf (llamacpp)"),
    backend: Optional[str] = typer.Option(None, help="torch, ort, tensorrt or llamacpp (default: the one that runs MODEL as it is)"),
    prompt: str = typer.Option(..., help="Text to continue"),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate (greedy)"),
    device: str = typer.Option("auto", help="torch backend: auto (CUDA when present), cpu or cuda"),
    provider: str = typer.Option("cpu", help="ort backend: cpu, cuda or tensorrt"),
    tokenizer_path: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: next to the model)"),
):
    """Greedy generation on any backend, so you can see the pruned model talk."""
    result = generate(backend, model, prompt, max_new_tokens, device=device, provider=provider, tokenizer_path=tokenizer_path)
    show.generation(result, result["backend"])


@app.command("inspect")
def inspect_cmd(
    target: str = typer.Argument(..., help="A checkpoint folder (or model spec), or an .onnx file"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
):
    """Per-linear table: shape, storage, density, 2:4 validity along the input axis, outlier rows, FLOPs, bytes."""
    onnx = target.endswith(".onnx")
    result = {"weights": onnx_weights(target)} if onnx else inspect_checkpoint(target)
    if as_json:
        print(json.dumps(result))
    elif onnx:
        show.onnx_weights(target, result["weights"])
    else:
        show.inspection(result)


def _exceptions(name: str) -> tuple:
    """An exception class of click and, when Typer runs on its vendored click, of that copy too."""
    kinds = [click.exceptions] + ([vendored_click] if vendored_click else [])
    return tuple(getattr(k, name) for k in kinds if hasattr(k, name))


def _usage_error(e) -> None:
    """click's usage line, then one `error:` line with the problem and where the options are."""
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        print(ctx.get_usage(), file=sys.stderr)
    fix = f": see '{ctx.command_path} --help'" if ctx is not None else ""
    print(f"error: {e.format_message().rstrip('.')}{fix}", file=sys.stderr)


def _environment_error(e: OSError) -> str:
    """An OS refusal (a full disk, a read-only or special path) as a problem and its fix."""
    where = f" '{e.filename}'" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"no space left on the device writing{where} ({e.strerror}): free some space or choose another --out"
    return f"cannot use{where}: {e.strerror or e}: check the path and its permissions, or choose another --out"


def main(argv: list[str] | None = None) -> int:
    """Run one command line (default: sys.argv[1:]); returns the exit code: 0, 2 for bad input
    (one `error:` line on stderr, no traceback), 130 for Ctrl-C. Given `argv`, sys.argv says it
    while the command runs, so what records or repeats the command line (manifests, the resume
    hint) sees this one."""
    if argv is not None:
        saved, sys.argv = sys.argv, ["thanos-deploy", *argv]
        try:
            return main()
        finally:
            sys.argv = saved
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        code = app(args=sys.argv[1:], prog_name="thanos-deploy", standalone_mode=False)  # Typer turns Ctrl-C into 130 here
    except UserError as e:
        if not distributed.quiet(e):
            print(f"error: {e}", file=sys.stderr)
        return distributed.LOST_EXIT if isinstance(e, PeerLost) else 2
    except _exceptions("NoArgsIsHelpError"):
        return 2  # Typer has printed the help already
    except _exceptions("UsageError") as e:
        _usage_error(e)
        return 2
    except _exceptions("Abort") + (typer.Abort,):
        print("aborted", file=sys.stderr)
        return 130
    except _exceptions("ClickException") as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code or 2
    except OSError as e:
        print(f"error: {_environment_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        print("interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
