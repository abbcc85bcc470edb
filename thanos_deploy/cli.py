"""The `thanos-deploy` command line: each command is a thin layer over the Python API."""

from __future__ import annotations

import json
import platform
import re
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import click
import torch
import typer
from rich.console import Console
from rich.table import Table

from . import activations, checkpoint, data, models
from . import resume as resume_run
from .driver import compress_model
from .errors import UserError
from .evaluate import perplexity
from .methods import get_method
from .compact import pack_model, shrink_model
from .compact.plain import plain_config
from .inspect import inspect_model
from .offload import load_skeleton, wants_offload
from .patterns import NM, Structured, check_shape, parse_pattern
from .targets import select

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help shows patterns literally: Rich would read `N:M:` as an emoji code
    help="Prune LLMs with Thanos, SparseGPT, Wanda or magnitude; evaluate, save and ship them.",
)
console = Console()
if not console.is_terminal:
    console.width = 160  # logs and pipes: no wrapping of the tables


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def _at_least(minimum: int, **values: int) -> None:
    """Counts given on the command line (window lengths, token budgets) must be at least `minimum`."""
    for name, value in values.items():
        if value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}: pass a larger value")


def _seqlen(model, seqlen: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(seqlen, limit) if limit else seqlen


def _versions() -> dict:
    names = ["thanos-deploy", "torch", "transformers", "safetensors", "onnx", "onnxruntime"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _eval(model, tokenizer, source: str, seqlen: int, max_windows: int, device) -> dict:
    stream = data.evaluation_tokens(source, tokenizer)
    result = perplexity(model, data.windows(stream, _seqlen(model, seqlen), max_windows), device=device)
    return {"data": source, **result}


@app.command()
def compress(
    model: str = typer.Argument(models.SMOLLM2_ALIAS, help="HF folder, hub id, .gguf file, or smollm2-135m"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write the pruned checkpoint to (default: a new folder named after model, method and pattern)"),
    method: str = typer.Option("thanos", help="thanos, sparsegpt, wanda or magnitude"),
    pattern: str = typer.Option("2:4", help="N:M (e.g. 2:4), unstructured:P or structured:P"),
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
):
    """Prune MODEL layer by layer and save it as a Hugging Face folder with thanos_deploy.json."""
    m = get_method(method)
    patt = parse_pattern(pattern)
    options = m.options(patt, {"alpha": alpha, "block_size": block_size, "row_batch": row_batch, "percdamp": percdamp})
    storage = _storage(patt, shrink, pack)
    _save_dtype(save_dtype)
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {nsamples}")
    _at_least(1, seqlen=seqlen, batch_tokens=batch_tokens, eval_seqlen=eval_seqlen)
    _at_least(0, eval_windows=eval_windows)
    out = out if out is not None else default_out(model, m.name, str(patt))
    checkpoint.check_output(out, overwrite)
    dev = _device(device)

    offloaded = wants_offload(model, offload, compatible=storage == "masked" and eval_windows == 0)
    if offloaded and storage != "masked":
        raise UserError("--offload writes masked checkpoints: drop --shrink/--pack, then run `thanos-deploy shrink` or `pack` on the output")
    if offloaded and eval_windows > 0:
        raise UserError("--offload never holds the whole model, so it cannot evaluate it: drop --eval-windows and run `thanos-deploy eval` on the output")
    run = resume_run.RunFolder(out, resume=resume, overwrite=overwrite)
    with resume_run.guard(run, "thanos-deploy"):
        started = time.perf_counter()
        with console.status(f"loading {model}"):
            if offloaded:
                net, tokenizer, weights = load_skeleton(model, dtype=dtype)
            else:
                (net, tokenizer), weights = models.load(model, dtype=dtype), None
        for i, subs in enumerate(select(net, targets, ignore)):
            for name, linear in subs.items():
                check_shape(patt, f"layers.{i}.{name}", linear.in_features)
        if calib_tokens is not None:
            ids = data.load_token_file(calib_tokens)
            calib_source = str(calib_tokens)
        else:
            with console.status(f"tokenizing calibration data '{calib}'"):
                ids = data.calibration_tokens(calib, tokenizer, nsamples=nsamples, seqlen=_seqlen(net, seqlen), seed=seed)
            calib_source = calib
        data.check_tokens(ids, net.config.vocab_size)
        if _seqlen(net, ids.shape[1]) < ids.shape[1]:
            raise UserError(f"calibration windows of {ids.shape[1]} tokens exceed this model's maximum of {_seqlen(net, ids.shape[1])}")

        evaluation = {}
        if eval_windows > 0:
            with console.status("evaluating the dense model"):
                evaluation["dense"] = _eval(net, tokenizer, eval_data, eval_seqlen, eval_windows, dev)

        run.start(
            {"model": model, **resume_run.model_identity(models.resolve(model)), "dtype": str(next(net.parameters()).dtype),
             "tokens_hash": data.token_hash(ids), "method": m.name, "pattern": str(patt), "options": options, "targets": targets or [], "ignore": ignore or [], "storage": storage,
             "save_dtype": save_dtype, "batch_tokens": batch_tokens, "device": dev.type, "versions": _versions()},
            net, weights=weights, write_dtype=_save_dtype(save_dtype) if storage == "masked" else None,
            activations_on_disk=activations.wants_on_disk(activations_on_disk, net, ids),
        )
        report = compress_model(net, ids, method=m.name, pattern=patt, device=dev, batch_tokens=batch_tokens, progress=True,
                                targets=targets, ignore=ignore, store=run, **options)

        if eval_windows > 0:
            with console.status("evaluating the pruned model"):
                evaluation["pruned"] = _eval(net, tokenizer, eval_data, eval_seqlen, eval_windows, dev)

        manifest = {
            "format": "thanos-deploy/1",
            "storage": "masked",
            "source_model": model,
            "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
            **{k: report[k] for k in ("method", "pattern", "options", "sparsity", "targets", "ignore")},
            "calibration": {
                "source": calib_source,
                "nsamples": int(ids.shape[0]),
                "seqlen": int(ids.shape[1]),
                "seed": seed if calib_tokens is None else None,
                "tokens_hash": data.token_hash(ids),
            },
            "evaluation": evaluation or None,
            "versions": _versions(),
            "seconds": {**report["seconds"], "command": round(time.perf_counter() - started, 3)},
            "layers": report["layers"],
        }
        manifest = _compact(net, manifest, storage, save_dtype)
        with console.status(f"saving to {out}"):
            if storage == "masked":
                run.finish(tokenizer, manifest, overwrite=overwrite)
            else:
                checkpoint.save(net, tokenizer, out, manifest, overwrite=overwrite)
                run.close(discard=True)
        _print_report(report, evaluation, out)
        if storage != "masked":
            _print_inspect(inspect_model(net, manifest), totals_only=True)


def default_out(model: str, method: str, pattern: str) -> Path:
    """A new folder in the current directory named after the model, method and pattern; never an existing one."""
    stem = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    base = re.sub(r"[^\w.]+", "-", f"{stem}-{method}-{pattern}").strip("-")
    candidate, n = Path(base), 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate


def _storage(pattern, shrink: bool, pack: bool) -> str:
    if shrink and pack:
        raise UserError("--shrink and --pack exclude each other: --shrink is for structured patterns, --pack for N:M")
    if shrink and not isinstance(pattern, Structured):
        raise UserError(f"--shrink needs a structured pattern (structured:P), not {pattern}; use --pack for N:M")
    if pack and not isinstance(pattern, NM):
        raise UserError(f"--pack needs an N:M pattern (e.g. 2:4), not {pattern}; use --shrink for structured")
    return "shrunk" if shrink else "packed" if pack else "masked"


def _save_dtype(name: str):
    if name != "auto" and name not in models.DTYPES:
        raise UserError(f"unknown --save-dtype '{name}': choose auto, {', '.join(models.DTYPES)}")
    return models.DTYPES.get(name)


def _compact(net, manifest: dict, storage: str, save_dtype: str = "auto") -> dict:
    """Cast for saving, then shrink or pack in place; returns the manifest to save."""
    if (dtype := _save_dtype(save_dtype)) is not None:
        net.to(dtype)
        manifest = {**manifest, "dtype": str(dtype).removeprefix("torch.")}
    if storage == "masked":
        return manifest
    pattern = parse_pattern(manifest["pattern"])
    alpha = (manifest.get("options") or {}).get("alpha") or 0.0
    modules = shrink_model(net, alpha=alpha) if storage == "shrunk" else pack_model(net, pattern, alpha=alpha)
    manifest = {**manifest, "storage": storage, "modules": modules}
    if storage == "shrunk" and (plain := plain_config(net, modules)):
        (field, (old, new)), = plain.items()
        console.print(f"plain Hugging Face checkpoint: every MLP narrowed alike, config {field} {old} → {new}; "
                      "stock transformers loads it with no code from thanos-deploy")
        manifest["plain"] = plain
    return manifest


def _convert(source: str, out: Path, storage: str, overwrite: bool, pattern: Optional[str], save_dtype: str) -> None:
    checkpoint.check_output(out, overwrite)
    _save_dtype(save_dtype)
    folder = Path(source)
    manifest = checkpoint.read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        if pattern is None:
            raise UserError(f"'{source}' has no {checkpoint.MANIFEST}: pass --pattern to say how it was pruned")
        manifest = {"format": "thanos-deploy/1", "storage": "masked", "source_model": source, "pattern": pattern}
    elif manifest.get("pattern") is None:
        if pattern is None:
            raise UserError(f"'{source}/{checkpoint.MANIFEST}' does not say the pattern: pass --pattern to say how it was pruned")
        manifest = {**manifest, "pattern": pattern}
    elif pattern is not None and parse_pattern(pattern) != parse_pattern(manifest["pattern"]):
        raise UserError(f"--pattern {pattern} disagrees with the checkpoint's pattern {manifest['pattern']}")
    if manifest.get("storage", "masked") != "masked":
        raise UserError(f"'{source}' is already {manifest['storage']}: {storage} works on masked checkpoints")
    _storage(parse_pattern(manifest["pattern"]), storage == "shrunk", storage == "packed")
    net, tokenizer = models.load(source)
    manifest = _compact(net, {k: v for k, v in manifest.items() if k != "files"}, storage, save_dtype)
    checkpoint.save(net, tokenizer, out, manifest, overwrite=overwrite)
    _print_inspect(inspect_model(net, manifest), totals_only=True)
    console.print(f"saved to {out}")


def _converter(storage: str, what: str, doc: str):
    def command(
        model: str = typer.Argument(..., help=f"A masked checkpoint pruned with {what} pattern"),
        out: Path = typer.Option(..., "--out", "-o", help=f"Folder for the {storage} checkpoint"),
        pattern: Optional[str] = typer.Option(None, help="The pattern, when the folder has no thanos_deploy.json"),
        save_dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16"),
        overwrite: bool = typer.Option(False, help="Replace --out if it exists"),
    ):
        _convert(model, out, storage, overwrite, pattern, save_dtype)

    command.__doc__ = doc
    return command


app.command("shrink")(_converter("shrunk", "a structured", "Remove structured-pruned columns physically (and narrow MLPs without outlier rows)."))
app.command("pack")(_converter("packed", "an N:M", "Store N:M weights packed: kept values plus their positions (2 bits each for 2:4)."))


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
    from .exporters.onnx import TOLERANCE, write_artifact

    if dtype not in TOLERANCE:
        raise UserError(f"unknown --dtype '{dtype}': use fp32 or fp16")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise UserError(f"unknown --exporter '{exporter}': use auto, dynamo or legacy")
    checkpoint.check_output(out, overwrite)
    net, tokenizer = models.load(model)
    with console.status("exporting and verifying (a minute for SmolLM2)"):
        report = write_artifact(net, tokenizer, out, dtype=dtype, with_past=past, exporter=exporter, overwrite=overwrite)
    _print_export(report, out)


def _print_export(report: dict, out: Path) -> None:
    console.print(f"exported with the {report['exporter']} exporter in {report['export_seconds']:.1f} s"
                  + (f" ({report['fallback_reason']})" if report["fallback_reason"] else ""))
    for c in report["verification"]["checks"]:
        console.print(f"  ORT vs PyTorch, batch {c['batch']} seq {c['seq']} past {c['past']}: max abs diff logits "
                      f"{c['max_abs_logits']:.2e}, present {c['max_abs_present']:.2e}")
    t = report["two_four"]
    console.print(f"  2:4 along K (TensorRT's rule): {t['two_four_along_k']} of {t['weights']} MatMul/Gemm weights")
    console.print(f"saved to {out}")


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
    from .exporters.tensorrt import build_engine, parse_shapes, require_tensorrt
    from .runtime.ort import onnx_path as resolve_onnx

    source = resolve_onnx(onnx_path)
    parse_shapes(shapes)
    checkpoint.check_output(out, overwrite)
    require_tensorrt()
    report = build_engine(source, out, sparse=sparse, shapes=shapes, workspace_mib=workspace_mib)
    s = report["sparsity"]
    console.print(f"engine saved to {out} (TensorRT {report['tensorrt']})")
    console.print(f"sparse math: {len(s['eligible'])} layers eligible, {len(s['picked_sparse'])} picked a sparse tactic")
    console.print(f"equivalent: {report['trtexec']}")


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
    from transformers import AutoTokenizer

    from .runtime import open_backend

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    options = {"device": _device(device).type} if backend == "torch" else {"provider": provider} if backend == "ort" else {}
    runner = open_backend(backend, model, **options)
    tokenizer = getattr(runner, "tokenizer", None)
    if tokenizer is None:
        where = tokenizer_path or (Path(model).parent if Path(model).is_file() else model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError):
            raise UserError(f"no tokenizer found in '{where}': pass --tokenizer FOLDER") from None
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    if ids.numel() == 0:
        raise UserError("--prompt is empty")
    t0 = time.perf_counter()
    out = runner.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - t0
    console.print(prompt, style="bold", end="")
    console.print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), highlight=False)
    console.print(f"[{backend}] {out.shape[1] - ids.shape[1]} tokens in {seconds:.2f} s", style="dim")


@app.command("inspect")
def inspect_cmd(
    target: str = typer.Argument(..., help="A checkpoint folder (or model spec), or an .onnx file"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
):
    """Per-linear table: shape, storage, density, 2:4 validity along the input axis, outlier rows, FLOPs, bytes."""
    if target.endswith(".onnx"):
        return _inspect_onnx(target, as_json)
    net, _ = models.load(target)
    folder = Path(target)
    result = inspect_model(net, checkpoint.read_manifest(folder) if folder.is_dir() else None)
    if as_json:
        print(json.dumps(result))
    else:
        _print_inspect(result)


def _inspect_onnx(path: str, as_json: bool) -> None:
    from .exporters.sparsity import check_model

    from google.protobuf.message import DecodeError

    if not Path(path).is_file():
        raise UserError(f"ONNX file '{path}' does not exist: check the path")
    if Path(path).stat().st_size == 0:
        raise UserError(f"ONNX file '{path}' is empty: re-export it (thanos-deploy export onnx)")
    try:
        rows = check_model(path)
    except (DecodeError, ValueError, OSError) as e:
        raise UserError(f"'{path}' is not a readable ONNX model ({str(e).splitlines()[0]}): re-export it (thanos-deploy export onnx)") from None
    if as_json:
        print(json.dumps({"weights": rows}))
        return
    table = Table(title=f"{path}: MatMul/Gemm weights, 2:4 along K (TensorRT's rule)")
    for col in ("node", "op", "initializer", "shape", "K axis", "2:4 along K", "density", "bytes"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["node"], r["op"], r["initializer"], "×".join(map(str, r["shape"])), str(r["k_axis"]),
                      "yes" if r["two_four"] else "no", f"{r['density']:.3f}", str(r["bytes"]))
    console.print(table)
    console.print(f"{sum(r['two_four'] for r in rows)} of {len(rows)} weights are 2:4 along K · {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB")


def _print_inspect(result: dict, totals_only: bool = False) -> None:
    t = result["totals"]
    if not totals_only:
        table = Table(title=f"storage: {result['storage']}")
        for col in ("linear", "shape", "storage", "density", "2:4 (K)", "outlier rows", "FLOPs vs dense", "bytes vs dense"):
            table.add_column(col, justify="left" if col in ("linear", "storage") else "right")
        for r in result["rows"]:
            table.add_row(
                r["name"], "×".join(map(str, r["shape"])), r["storage"], f"{r['density']:.3f}",
                "yes" if r["two_four"] else f"no ({r['two_four_rows']})", str(r["outlier_rows"]),
                f"{r['flops_vs_dense']:.3f}", f"{r['bytes'] / r['dense_bytes']:.3f}",
            )
        console.print(table)
    console.print(
        f"{t['linears']} linears · density {t['density']:.3f} · FLOPs {t['flops_vs_dense']:.3f}× dense · "
        f"{t['bytes'] / 2**20:.1f} MiB ({t['bytes'] / t['dense_bytes']:.3f}× the same weights dense) · "
        f"2:4 along K in {t['two_four_linears']}/{t['linears']} linears"
    )


def _print_report(report: dict, evaluation: dict, out: Path) -> None:
    table = Table(title=f"{report['method']} {report['pattern']}", show_lines=False)
    for col in ("layer", "sparsity", "mean rel. error", "max rel. error", "prune s", "total s"):
        table.add_column(col, justify="right")
    for layer in (r for r in report["layers"] if r["linears"]):  # layers --targets left alone have no row
        errs = [e["relative_error"] for e in layer["linears"]]
        zeros = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for e in layer["linears"])
        size = sum(e["shape"][0] * e["shape"][1] for e in layer["linears"])
        secs = layer["seconds"]
        table.add_row(
            str(layer["index"]),
            f"{zeros / size:.3f}",
            f"{sum(errs) / len(errs):.4f}",
            f"{max(errs):.4f}",
            f"{secs['prune']:.2f}",
            f"{sum(secs.values()):.2f}",
        )
    console.print(table)
    warned = [w for layer in report["layers"] for e in layer["linears"] for w in e.get("warnings", [])]
    for w in warned[:5]:
        console.print(f"warning: {w}", style="yellow", highlight=False)
    if len(warned) > 5:
        console.print(f"warning: {len(warned) - 5} more in {checkpoint.MANIFEST} (layers[].linears[].warnings)", style="yellow")
    s = report["seconds"]
    console.print(
        f"sparsity {report['sparsity']:.4f} of the decoder linears · {s['total']:.1f} s "
        f"(statistics {s['statistics']:.1f}, pruning math {s['prune']:.1f}, forward {s['forward']:.1f})"
    )
    if evaluation:
        d, p = evaluation["dense"], evaluation["pruned"]
        console.print(
            f"perplexity on {d['data']} ({d['windows']}×{d['seqlen']} tokens): dense {d['perplexity']:.3f} → "
            f"pruned {p['perplexity']:.3f} ({p['perplexity'] / d['perplexity']:.2f}×)"
        )
    console.print(f"saved to {out}")


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
    from .compare import compare, document, parse_methods, write

    runs = parse_methods(methods)
    _at_least(1, seqlen=seqlen, eval_seqlen=eval_seqlen)
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {nsamples}")
    if out is not None:
        checkpoint.check_output(out, overwrite)
    dev = _device(device)
    protocol = dict(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, eval_data=eval_data, eval_seqlen=eval_seqlen, eval_windows=eval_windows)
    started = time.perf_counter()
    results = compare(
        model, runs, parse_pattern(pattern), device=dev, progress=not as_json, targets=targets, ignore=ignore,
        on_run=None if as_json else lambda i, n, run: console.print(f"run {i} of {n}: {run.label}", style="dim", highlight=False),
        **protocol,
    )
    if out is not None:
        write(document(results, {"model": model, "pattern": str(parse_pattern(pattern)), **protocol, "device": dev.type,
                                 "targets": targets, "ignore": ignore},
                       command="thanos-deploy " + shlex.join(sys.argv[1:]), seconds=time.perf_counter() - started), out, overwrite)
    if as_json:
        print(json.dumps(results))
        return
    console.print(results_table(results, f"{model} · {pattern} · calibration {nsamples}×{seqlen} {calib}"))
    if out is not None:
        console.print(f"wrote compare.json, compare.md and compare.png to {out}")


def results_table(results: list[dict], title: str) -> Table:
    """The comparison table: perplexity, ratio to dense, achieved sparsity, seconds."""
    from .compare import table

    header, cells = table(results)
    rich_table = Table(title=title)
    for col in header:
        rich_table.add_column(col, justify="left" if col == "method" else "right")
    for row in cells:
        rich_table.add_row(*row)
    return rich_table


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
    if max_windows < 0:
        raise UserError(f"--max-windows must be 0 (all) or positive, got {max_windows}")
    _at_least(1, seqlen=seqlen)
    dev = _device(device)
    net, tokenizer = models.load(model, dtype=dtype)
    result = {"model": model, **_eval(net, tokenizer, data_source, seqlen, max_windows, dev)}
    if as_json:
        print(json.dumps(result))
    else:
        console.print(
            f"{model}: perplexity {result['perplexity']:.3f} on {data_source} "
            f"({result['windows']} windows × {result['seqlen']} tokens)"
        )


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
    from rich.progress import Progress

    from . import bench, benchmark

    grid = benchmark.default_grid(_device(device).type, quick)
    grid = benchmark.Grid(
        _ints(batch_sizes, "--batch-sizes") or grid.batch_sizes, _ints(prompt_lengths, "--prompt-lengths") or grid.prompt_lengths,
        decode_tokens if decode_tokens is not None else grid.decode_tokens, reps if reps is not None else grid.repetitions,
    )
    out = out or Path(time.strftime("bench-%Y%m%d-%H%M%S"))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmark", total=None)
        result = bench.run(
            dense, candidates or [], out, plan=plan, backends=backend, device=_device(device).type, dtype=dtype, grid=grid,
            calib=calib, calib_tokens=calib_tokens, nsamples=nsamples or (16 if quick else 64), seqlen=seqlen or (256 if quick else 512),
            eval_data=eval_data, eval_windows=eval_windows if eval_windows is not None else (8 if quick else 32),
            eval_seqlen=eval_seqlen or (256 if quick else 512), peak_memory=peak_memory, overwrite=overwrite,
            command="thanos-deploy " + " ".join(sys.argv[1:]), on_step=lambda message: _progress(progress, task, message),
        )
    console.print(benchmark.describe(result), highlight=False)
    for title, header, rows in benchmark.tables(result):
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="left" if col in ("candidate", "what ran") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"wrote bench.json, bench.md, latency.png and pareto.png to {out} in {result['seconds']:.0f} s")


def _progress(progress, task, message: str) -> None:
    """The progress bar on a terminal; one line per step in a log."""
    progress.update(task, description=message)
    if not console.is_terminal:
        console.print(message, style="dim", highlight=False)


def _ints(text: Optional[str], option: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, e.g. 1,4, not '{text}'") from None


def _click_exceptions() -> list:
    """The exception modules of every click the app may raise from: Typer >= 0.2x runs on its own
    vendored copy (typer._click), whose classes are not click's; older Typer raises click's."""
    found = [click.exceptions]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        return found
    return found + [vendored]


def _usage_error(e) -> None:
    """click's usage line, then one `error:` line with the problem and where the options are."""
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        print(ctx.get_usage(), file=sys.stderr)
    fix = f": see '{ctx.command_path} --help'" if ctx is not None else ""
    print(f"error: {e.format_message().rstrip('.')}{fix}", file=sys.stderr)


def _environment_error(e: OSError) -> str:
    """An OS refusal (a full disk, a read-only or special path) as a problem and its fix."""
    import errno

    where = f" '{e.filename}'" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"no space left on the device writing{where} ({e.strerror}): free some space or choose another --out"
    return f"cannot use{where}: {e.strerror or e}: check the path and its permissions, or choose another --out"


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    kinds = _click_exceptions()
    no_args_help = tuple(k.NoArgsIsHelpError for k in kinds if hasattr(k, "NoArgsIsHelpError"))
    usage = tuple(k.UsageError for k in kinds)
    abort = tuple(k.Abort for k in [*kinds, typer.exceptions] if hasattr(k, "Abort"))
    other = tuple(k.ClickException for k in kinds)
    try:
        code = app(standalone_mode=False)  # Typer turns Ctrl-C into the return value 130 here
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except no_args_help:
        sys.exit(2)  # Typer has printed the help already
    except usage as e:
        _usage_error(e)
        sys.exit(2)
    except abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except other as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code if e.exit_code else 2)
    except OSError as e:
        print(f"error: {_environment_error(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        print("interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
