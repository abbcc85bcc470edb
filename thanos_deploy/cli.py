"""The `thanos-deploy` command line: each command parses its options, calls the library (the same
functions the Python API offers) and hands the result to console.py to show. No decisions here."""

from __future__ import annotations

import errno
import json
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import click
import transformers
import typer
from rich.progress import Progress

from .bench.report import describe as describe_bench, tables as bench_tables
from .bench.run import bench
from .compare import sweep, table as compare_table
from .console import console, step_reporter, table
from . import console as show
from .errors import PeerLost, UserError
from .evaluate import evaluate_model
from .exporters.onnx import export_checkpoint
from .exporters.sparsity import check_file as onnx_weights
from .exporters.tensorrt import build_engine_from
from .inspection import inspect_checkpoint, inspect_model
from .loading import SMOLLM2_ALIAS
from .oneshot import convert, default_out, oneshot, storage_from_flags
from .pipeline import distributed
from .recover import DEFAULT_TOKENS, Settings, parse_duration, recover
from .runtime import generate

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


TARGETS_HELP = ("Prune only these linears (repeatable): an exact module name, a suffix such as down_proj, or re:REGEX "
                "(llm-compressor's convention); default: every linear of every decoder layer")
IGNORE_HELP = "Leave these linears dense (repeatable; same patterns as --targets)"


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
def compress(
    model: str = typer.Argument(SMOLLM2_ALIAS, help="HF folder, hub id, .gguf file, or smollm2-135m"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write the pruned checkpoint to (default: a new folder named after model, method and pattern)"),
    method: str = typer.Option("thanos", help="thanos, sparsegpt, wanda, magnitude, or activation (Minitron's activation importance; width and structured patterns only)"),
    pattern: str = typer.Option("2:4", help="N:M (e.g. 2:4), unstructured:P, structured:P, or width:mlp=F,heads=F,kv_heads=F "
                                 "(fractions removed) / width:intermediate_size=N,num_attention_heads=N,num_key_value_heads=N (kept): a plain config"),
    calib: str = typer.Option("austen", help="austen, c4, wikitext2, or a .txt/.jsonl file"),
    calib_tokens: Optional[Path] = typer.Option(None, help="Exact calibration tokens [n, seqlen]: .pt, .npy or .safetensors"),
    nsamples: int = typer.Option(128, help="Calibration windows"),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window (capped by the model's maximum)"),
    seed: int = typer.Option(0, help="Seed of the calibration windows"),
    alpha: Optional[float] = typer.Option(None, help="Thanos: fraction of outlier rows kept dense (N:M and structured)"),
    block_size: Optional[int] = typer.Option(None, help="Thanos/SparseGPT: columns per block"),
    row_batch: Optional[int] = typer.Option(None, help="Thanos: rows solved per batched call (memory knob)"),
    percdamp: Optional[float] = typer.Option(None, help="Thanos/SparseGPT: Hessian damping, relative to mean(diag H)"),
    device: str = typer.Option("auto", help="Where each decoder layer is pruned: auto (CUDA when present), cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16"),
    batch_tokens: int = typer.Option(8192, help="Tokens per calibration forward batch (bounds memory)"),
    eval_windows: int = typer.Option(0, help="Also report dense and pruned perplexity on this many windows"),
    eval_data: str = typer.Option("austen", help="Evaluation data for --eval-windows"),
    eval_seqlen: int = typer.Option(512, help="Window length for --eval-windows"),
    shrink: bool = typer.Option(False, help="structured: remove the pruned columns physically"),
    pack: bool = typer.Option(False, help="N:M: store the pattern rows packed (values + 2-bit positions for 2:4)"),
    save_dtype: str = typer.Option("auto", help="Save in this dtype: auto (as pruned), float32, float16 or bfloat16"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help=TARGETS_HELP),
    ignore: Optional[list[str]] = typer.Option(None, "--ignore", help=IGNORE_HELP),
    resume: bool = typer.Option(False, help="Continue an unfinished run of the same command from its last finished layer"),
    offload: Optional[bool] = typer.Option(None, "--offload/--no-offload", help="Read one decoder layer at a time from disk (default: when the model would not fit in memory)"),
    activations_on_disk: Optional[bool] = typer.Option(None, "--activations-on-disk/--activations-in-memory",
                                                       help="Keep the calibration activations between layers on disk, read one batch at a time (default: when they would not fit in memory)"),
    nproc: int = typer.Option(1, "--nproc", help="Run as this many processes through torch's launcher (as torchrun --nproc-per-node N): "
                              "each calibrates on its share of the windows, the linears' solves are spread over them; one GPU each on CUDA"),
):
    """Prune MODEL layer by layer and save it as a Hugging Face folder with thanos_deploy.json."""
    if nproc != 1:
        raise typer.Exit(distributed.launch(nproc, sys.argv[1:]))
    out = out if out is not None else default_out(model, method, pattern)
    result = oneshot(
        model, out, method=method, pattern=pattern, options={"alpha": alpha, "block_size": block_size, "row_batch": row_batch, "percdamp": percdamp},
        storage=storage_from_flags(shrink, pack), save_dtype_name=save_dtype, calib=calib, calib_tokens=calib_tokens, nsamples=nsamples,
        seqlen=seqlen, seed=seed, device=device, dtype=dtype, batch_tokens=batch_tokens, targets=targets, ignore=ignore,
        eval_windows=eval_windows, eval_data=eval_data, eval_seqlen=eval_seqlen, resume_run=resume, offload=offload,
        activations_on_disk=activations_on_disk, overwrite=overwrite, progress=True, status=console.status, say=console.print,
    )
    if result.process != 0:
        return  # process 0 reports
    show.compress_report(result.report, result.manifest, out)
    if result.manifest["storage"] != "masked":
        show.inspection(inspect_model(result.model, result.manifest), totals_only=True)


def _converter(storage: str, what: str, doc: str):
    def command(
        model: str = typer.Argument(..., help=f"A masked checkpoint pruned with {what} pattern"),
        out: Path = typer.Option(..., "--out", "-o", help=f"Folder for the {storage} checkpoint"),
        pattern: Optional[str] = typer.Option(None, help="The pattern, when the folder has no thanos_deploy.json"),
        save_dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16"),
        overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
    ):
        result = convert(model, out, storage, pattern=pattern, save_dtype_name=save_dtype, overwrite=overwrite)
        show.inspection(inspect_model(result.model, result.manifest), totals_only=True)
        show.plain_note(result.manifest)
        console.print(f"saved to {out}")

    command.__doc__ = doc
    return command


app.command("shrink")(_converter("shrunk", "a structured", "Remove structured-pruned columns physically (and narrow MLPs without outlier rows)."))
app.command("pack")(_converter("packed", "an N:M", "Store N:M weights packed: kept values plus their positions (2 bits each for 2:4)."))


METHODS_HELP = ("Runs, comma-separated: dense, or a method with options after ':' (thanos:alpha=0.1; several options "
                "separated by ':' or ','). '|' makes a grid of every combination: thanos:block_size=32|128|512,alpha=0|0.05|0.1 "
                "is 9 runs (a comma followed by key=value continues the run before it). @FILE reads the specs from a file, "
                "one or more a line, '#' comments")


@app.command("compare")
def compare_cmd(
    model: str = typer.Argument(..., help="HF folder, hub id, .gguf file, or smollm2-135m"),
    pattern: str = typer.Option("2:4", help="N:M (e.g. 2:4), unstructured:P or structured:P"),
    methods: str = typer.Option("dense,wanda,sparsegpt,thanos", help=METHODS_HELP),
    calib: str = typer.Option("austen", help="austen, c4, wikitext2, or a .txt/.jsonl file"),
    nsamples: int = typer.Option(64, help="Calibration windows"),
    seqlen: int = typer.Option(512, help="Tokens per calibration window"),
    seed: int = typer.Option(0, help="Seed of the calibration windows"),
    eval_data: str = typer.Option("austen", help="Evaluation data"),
    eval_seqlen: int = typer.Option(512, help="Tokens per evaluation window"),
    eval_windows: int = typer.Option(64, help="Evaluation windows"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON"),
    targets: Optional[list[str]] = typer.Option(None, "--targets", help=TARGETS_HELP),
    ignore: Optional[list[str]] = typer.Option(None, "--ignore", help=IGNORE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write compare.json, compare.md and compare.png (perplexity against pruning seconds, Pareto front) to this folder"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
):
    """Prune MODEL with several methods (or a grid of options) on the same data and print their perplexity side by side."""
    rows = sweep(
        model, methods, pattern, out=out, overwrite=overwrite, command=_command_line(), calib=calib, nsamples=nsamples, seqlen=seqlen,
        seed=seed, eval_data=eval_data, eval_seqlen=eval_seqlen, eval_windows=eval_windows, device=device, targets=targets, ignore=ignore,
        progress=not as_json,
        on_run=None if as_json else lambda i, n, run: console.print(f"run {i} of {n}: {run.label}", style="dim", highlight=False),
    )
    if as_json:
        print(json.dumps(rows))
        return
    console.print(table(f"{model} · {pattern} · calibration {nsamples}×{seqlen} {calib}", *compare_table(rows)))
    if out is not None:
        console.print(f"wrote compare.json, compare.md and compare.png to {out}")


@app.command("recover")
def recover_cmd(
    pruned: str = typer.Argument(..., help="A pruned artifact written by compress: masked, packed, shrunk or width-pruned plain"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the recovered model, in PRUNED's storage, with recovery.json and recovery.png"),
    teacher: Optional[str] = typer.Option(None, help="The dense model to distil from (default: the model PRUNED was pruned from, per its manifest)"),
    data_source: str = typer.Option("austen", "--data", help="Training text, the calibration split: austen, wikitext2, c4, or a .txt/.jsonl file"),
    tokens: Optional[int] = typer.Option(None, help=f"Tokens to train on (default {DEFAULT_TOKENS:,} unless --max-time is given)"),
    max_time: Optional[str] = typer.Option(None, help="Time budget such as 20m or 1.5h; with --tokens, whichever ends first"),
    batch_size: int = typer.Option(4, help="Windows per step (split over torchrun's processes)"),
    seqlen: int = typer.Option(256, help="Tokens per training window"),
    lr: float = typer.Option(1e-4, help="AdamW peak learning rate (warm-up, then cosine to a tenth)"),
    warmup: float = typer.Option(0.05, help="Fraction of the steps spent warming up"),
    temperature: float = typer.Option(1.0, help="Distillation temperature T (loss T²·KL)"),
    ce_weight: float = typer.Option(0.0, help="Weight of the next-token cross-entropy added to the KL"),
    seed: int = typer.Option(0, help="Seed of the training windows"),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate (and checkpoint) every this many tokens (default: an eighth of the budget)"),
    eval_windows: int = typer.Option(8, help="Evaluation windows"),
    eval_seqlen: int = typer.Option(512, help="Tokens per evaluation window"),
    eval_data: str = typer.Option("austen", help="Evaluation data (austen: Emma and Persuasion, never trained on)"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda (bf16 autocast)"),
    teacher_dtype: str = typer.Option("auto", help="Teacher precision: auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16"),
    teacher_device: Optional[str] = typer.Option(None, help="Keep the teacher on another device, e.g. cpu to offload it from the GPU"),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in the backward pass: less memory, about a third more time"),
    resume: bool = typer.Option(False, help="Continue an unfinished run of the same command from its last checkpoint"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
):
    """Win back quality: distil the dense model into a pruned one, every pruned weight kept pruned."""
    settings = Settings(data=data_source, tokens=tokens, max_seconds=parse_duration(max_time), batch_size=batch_size, seqlen=seqlen, lr=lr,
                        warmup=warmup, temperature=temperature, ce_weight=ce_weight, seed=seed, eval_every=eval_every,
                        eval_windows=eval_windows, eval_seqlen=eval_seqlen, eval_data=eval_data)
    with show.recovery_progress() as (on_step, on_eval):
        result = recover(pruned, out, teacher=teacher, settings=settings, device=device, teacher_dtype=teacher_dtype, teacher_device=teacher_device,
                         gradient_checkpointing=gradient_checkpointing, resume_run=resume, overwrite=overwrite, on_step=on_step, on_eval=on_eval,
                         warn=show.warning, status=console.status)
    if result["matmul_rate"]:  # process 0 (the others of a torchrun job have nothing to report)
        show.recovery_report(result, out)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="HF folder, hub id, .gguf file, smollm2-135m, or a pruned checkpoint"),
    data_source: str = typer.Option("austen", "--data", help="austen, wikitext2, c4, or a .txt/.jsonl file"),
    seqlen: int = typer.Option(512, help="Tokens per window"),
    max_windows: int = typer.Option(0, help="Evaluate at most this many windows (0: all)"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
):
    """Perplexity over non-overlapping windows: exp(mean next-token cross-entropy)."""
    result = evaluate_model(model, data_source, seqlen, max_windows, device=device, dtype=dtype)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"{model}: perplexity {result['perplexity']:.3f} on {data_source} ({result['windows']} windows × {result['seqlen']} tokens)")


@app.command("bench")
def bench_cmd(
    dense: str = typer.Argument(..., help="The dense model (checkpoint, ONNX folder, plan, smollm2-135m); with --plan, the model to prune"),
    candidates: Optional[list[str]] = typer.Argument(None, help="Artifacts to compare: checkpoints (masked, shrunk, packed), ONNX folders, .plan files"),
    plan: Optional[str] = typer.Option(None, help="Build the candidates from DENSE: 'default' or a file with one 'PATTERN METHOD[:k=v]' per line"),
    backend: Optional[list[str]] = typer.Option(None, help="torch, ort or tensorrt; repeat for several (default: each artifact's own)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("auto", help="torch backend: auto, float32, float16 or bfloat16"),
    batch_sizes: Optional[str] = typer.Option(None, help="Comma-separated batch sizes (default for the device)"),
    prompt_lengths: Optional[str] = typer.Option(None, help="Comma-separated prompt lengths (default for the device)"),
    decode_tokens: Optional[int] = typer.Option(None, help="Decode steps timed per repetition"),
    reps: Optional[int] = typer.Option(None, help="Interleaved repetitions after warm-up"),
    quick: bool = typer.Option(False, help="Small grid, few repetitions, small calibration and evaluation sets"),
    calib: str = typer.Option("austen", help="--plan: calibration data (austen, c4, wikitext2, .txt/.jsonl)"),
    calib_tokens: Optional[Path] = typer.Option(None, help="--plan: exact calibration tokens [n, seqlen]"),
    nsamples: Optional[int] = typer.Option(None, help="--plan: calibration windows (16 with --quick, else 64)"),
    seqlen: Optional[int] = typer.Option(None, help="--plan: tokens per calibration window (256 with --quick, else 512)"),
    eval_data: str = typer.Option("austen", help="Evaluation data for perplexity"),
    eval_windows: Optional[int] = typer.Option(None, help="Evaluation windows (8 with --quick, else 32; 0 skips perplexity)"),
    eval_seqlen: Optional[int] = typer.Option(None, help="Tokens per evaluation window (256 with --quick, else 512)"),
    peak_memory: bool = typer.Option(True, "--peak-memory/--no-peak-memory", help="Measure each candidate's peak memory in a fresh process"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for bench.json, bench.md and the plots (default: bench-YYYYmmdd-HHMMSS)"),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
):
    """Latency and throughput of compressed models against dense: prefill, decode, p50/p90/p99, speed-ups with intervals, plots."""
    out = out or Path(time.strftime("bench-%Y%m%d-%H%M%S"))
    with Progress(console=console, transient=True) as progress:
        result = bench(
            dense, candidates or [], out, plan=plan, backends=backend, device=device, dtype=dtype, quick=quick,
            batch_sizes=_ints(batch_sizes, "--batch-sizes"), prompt_lengths=_ints(prompt_lengths, "--prompt-lengths"),
            decode_tokens=decode_tokens, reps=reps, calib=calib, calib_tokens=calib_tokens, nsamples=nsamples, seqlen=seqlen,
            eval_data=eval_data, eval_windows=eval_windows, eval_seqlen=eval_seqlen, peak_memory=peak_memory, overwrite=overwrite,
            command=_command_line(), on_step=step_reporter(progress, progress.add_task("benchmark", total=None)),
        )
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
    model: str = typer.Argument(..., help="torch: a checkpoint; ort: an exported folder or .onnx; tensorrt: a .plan"),
    backend: str = typer.Option("torch", help="torch, ort or tensorrt"),
    prompt: str = typer.Option(..., help="Text to continue"),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate (greedy)"),
    device: str = typer.Option("auto", help="torch backend: auto (CUDA when present), cpu or cuda"),
    provider: str = typer.Option("cpu", help="ort backend: cpu, cuda or tensorrt"),
    tokenizer_path: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: next to the model)"),
):
    """Greedy generation on any backend, so you can see the pruned model talk."""
    result = generate(backend, model, prompt, max_new_tokens, device=device, provider=provider, tokenizer_path=tokenizer_path)
    show.generation(result, backend)


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
