"""The one entry point that prunes a model and writes the artifact. The CLI's `compress`, `compare`,
`bench --plan` and the Python API all go through `oneshot`, so each decision is made here once:

1. checks that need no model: method, pattern, options, storage, counts, output path, device, and
   the calibration file (every field of it), all before any work;
2. load (or take a loaded model), then checks against it: targets, shapes, tokens, window length;
3. prune layer by layer (pipeline/sequential.py), resumable when writing a masked artifact;
4. evaluate (optional), cast for saving, compact (shrink / pack / plain), build the manifest;
5. write atomically: nothing half-written after an error, only after a kill (then `--resume`).

    result = oneshot("smollm2-135m", "out", method="thanos", pattern="2:4", storage="packed")
"""

from __future__ import annotations

import copy
import platform
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, data, loading, models, width
from .compact.pack import pack_model
from .compact.plain import plain_config
from .compact.shrink import shrink_model
from .errors import UserError, at_least
from .evaluate import evaluate
from .methods import Method, get_method
from .patterns import NM, Pattern, Structured, Width, parse_pattern
from .pipeline import activations, distributed, resume
from .pipeline.offload import load_skeleton, wants_offload
from .pipeline.sequential import compress_model
from .targets import select

FORMAT = "thanos-deploy/1"
STORAGES = ("masked", "packed", "shrunk", "plain")


@dataclass(frozen=True)
class Job:
    """A checked request: what to prune with, and how the result is stored."""

    method: Method
    pattern: Pattern
    options: dict
    storage: str
    save_dtype: torch.dtype | None
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()


@dataclass
class Result:
    model: nn.Module
    tokenizer: object
    report: dict  # per layer and linear: sparsity, errors, seconds (pipeline.sequential.compress_model)
    manifest: dict  # what thanos_deploy.json holds (or would hold, when nothing was written); {} on processes other than 0
    out: Path | None
    process: int = 0  # this process's rank in a run of several (process 0 writes and reports)


def storage_for(pattern: Pattern, storage: str) -> str:
    """The storage of an artifact: `auto` turns the zeros into savings (N:M packed, structured
    shrunk, width plain, unstructured masked); `default` is what `compress` writes without --shrink
    or --pack (plain for width patterns, masked otherwise); an explicit one must suit the pattern."""
    if storage == "auto":
        return "packed" if isinstance(pattern, NM) else "shrunk" if isinstance(pattern, Structured) else "plain" if isinstance(pattern, Width) else "masked"
    if storage == "default":
        return "plain" if isinstance(pattern, Width) else "masked"
    if storage not in STORAGES:
        raise UserError(f"unknown storage '{storage}': choose auto, {', '.join(STORAGES)}")
    if isinstance(pattern, Width) and storage not in ("plain", "masked"):
        raise UserError(f"{pattern} is written as a plain Hugging Face checkpoint: drop --shrink/--pack")
    if storage == "plain" and not isinstance(pattern, Width):
        raise UserError(f"plain storage needs a width pattern (width:mlp=F,heads=F), not {pattern}")
    if storage == "shrunk" and not isinstance(pattern, Structured):
        raise UserError(f"--shrink needs a structured pattern (structured:P), not {pattern}; use --pack for N:M")
    if storage == "packed" and not isinstance(pattern, NM):
        raise UserError(f"--pack needs an N:M pattern (e.g. 2:4), not {pattern}; use --shrink for structured")
    return storage


def storage_from_flags(shrink: bool, pack: bool) -> str:
    """The storage `compress --shrink` / `--pack` ask for."""
    if shrink and pack:
        raise UserError("--shrink and --pack exclude each other: --shrink is for structured patterns, --pack for N:M")
    return "shrunk" if shrink else "packed" if pack else "default"


def save_dtype(name: str) -> torch.dtype | None:
    """The dtype to save in (None: as pruned)."""
    if name != "auto" and name not in loading.DTYPES:
        raise UserError(f"unknown --save-dtype '{name}': choose auto, {', '.join(loading.DTYPES)}")
    return loading.DTYPES.get(name)


def prepare(method: str, pattern, options: dict | None = None, *, storage: str = "masked", save_dtype_name: str = "auto",
            targets=None, ignore=None) -> Job:
    """Every check of a request that needs no model; a bad one is a UserError before any work."""
    m = get_method(method)
    patt = parse_pattern(pattern)
    return Job(m, patt, m.options(patt, dict(options or {})), storage_for(patt, storage), save_dtype(save_dtype_name),
               tuple(targets or ()), tuple(ignore or ()))


def default_out(model: str, method: str, pattern: str) -> Path:
    """A new folder in the current directory named after the model, method and pattern; never an existing one."""
    stem = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    base = re.sub(r"[^\w.]+", "-", f"{stem}-{method}-{pattern}").strip("-")
    candidate, n = Path(base), 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate


def versions() -> dict:
    """Python and the library versions a result was made with (stored in the manifest)."""
    out = {"python": platform.python_version()}
    for name in ("thanos-deploy", "torch", "transformers", "safetensors", "onnx", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_model(model: nn.Module, job: Job) -> str | None:
    """The checks of a request against the model, before any work: targets and shapes; for a width
    pattern, its units in every layer and (written plain) the config that builds the new widths.
    Returns what a width pattern resolved to, to show the user."""
    select(model, job.targets, job.ignore, job.pattern)
    if not isinstance(job.pattern, Width):
        return None
    widths = width.plan(job.pattern, model.config)
    units = width.check_model(model, widths)
    if job.storage == "plain":
        width.plain_config(model, units, widths)
    return f"{job.pattern}: {widths.describe()}"


def calibration_ids(model: nn.Module, tokenizer, *, ids: torch.Tensor | None = None, calib: str = "austen", nsamples: int = 128,
                    seqlen: int = 2048, seed: int = 0, docs: list[str] | None = None) -> torch.Tensor:
    """Calibration windows [n, seqlen] for `model`: `ids` as given, or drawn from a text source
    with windows capped at the model's context; checked against its vocabulary and context."""
    if ids is None:
        ids = data.calibration_tokens(calib, tokenizer, nsamples=nsamples, seqlen=models.context_length(model, seqlen), seed=seed, docs=docs)
    data.check_tokens(ids, model.config.vocab_size)
    if models.context_length(model, ids.shape[1]) < ids.shape[1]:
        raise UserError(f"calibration windows of {ids.shape[1]} tokens exceed this model's maximum of {models.context_length(model, ids.shape[1])}")
    return ids


def manifest(job: Job, report: dict, *, source_model: str, model: nn.Module, ids: torch.Tensor, calibration: dict,
             evaluation: dict | None = None, seconds: float | None = None) -> dict:
    """What thanos_deploy.json says of a masked artifact (compaction adds storage and modules)."""
    return {
        "format": FORMAT,
        "storage": "masked",
        "source_model": source_model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **{k: report[k] for k in ("method", "pattern", "options", "sparsity", "targets", "ignore")},
        "world": report.get("world", 1),
        "calibration": {**calibration, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "tokens_hash": data.token_hash(ids)},
        "evaluation": evaluation or None,
        "versions": versions(),
        "seconds": {**report["seconds"], **({"command": round(seconds, 3)} if seconds is not None else {})},
        "layers": report["layers"],
    }


def compact(model: nn.Module, manifest: dict, storage: str, dtype: torch.dtype | None = None) -> dict:
    """Cast for saving, then shrink or pack in place; returns the manifest to save. A shrunk model
    whose MLPs all narrowed alike is recorded as `plain`: stock transformers loads it."""
    if dtype is not None:
        model.to(dtype)
        manifest = {**manifest, "dtype": str(dtype).removeprefix("torch.")}
    if storage == "masked":
        return manifest
    pattern = parse_pattern(manifest["pattern"])
    if storage == "plain":
        widths = width.plan(pattern, model.config)
        kept = [layer["units"] for layer in manifest["layers"]]
        changed = width.narrow(model, width.check_model(model, widths), kept, widths)
        return {**manifest, "storage": "plain", "plain": changed, "units": {f"layers.{i}": k for i, k in enumerate(kept)}}
    alpha = (manifest.get("options") or {}).get("alpha") or 0.0
    modules = shrink_model(model, alpha=alpha) if storage == "shrunk" else pack_model(model, pattern, alpha=alpha)
    manifest = {**manifest, "storage": storage, "modules": modules}
    if storage == "shrunk" and (plain := plain_config(model, modules)):
        manifest["plain"] = plain
    return manifest


def convert(source: str, out: Path, storage: str, *, pattern: str | None = None, save_dtype_name: str = "auto",
            overwrite: bool = False) -> Result:
    """`shrink` / `pack` of a masked checkpoint written earlier (or a folder pruned elsewhere, with `pattern`)."""
    checkpoint.check_output(out, overwrite)
    dtype = save_dtype(save_dtype_name)
    folder = Path(source)
    found = checkpoint.read_manifest(folder) if folder.is_dir() else None
    if found is None:
        if pattern is None:
            raise UserError(f"'{source}' has no {checkpoint.MANIFEST}: pass --pattern to say how it was pruned")
        found = {"format": FORMAT, "storage": "masked", "source_model": source, "pattern": pattern}
    elif found.get("pattern") is None:
        if pattern is None:
            raise UserError(f"'{source}/{checkpoint.MANIFEST}' does not say the pattern: pass --pattern to say how it was pruned")
        found = {**found, "pattern": pattern}
    elif pattern is not None and parse_pattern(pattern) != parse_pattern(found["pattern"]):
        raise UserError(f"--pattern {pattern} disagrees with the checkpoint's pattern {found['pattern']}")
    if found.get("storage", "masked") != "masked":
        raise UserError(f"'{source}' is already {found['storage']}: {storage} works on masked checkpoints")
    storage_for(parse_pattern(found["pattern"]), storage)
    net, tokenizer = loading.load(source)
    saved = compact(net, {k: v for k, v in found.items() if k != "files"}, storage, dtype)
    checkpoint.save(net, tokenizer, out, saved, overwrite=overwrite)
    return Result(net, tokenizer, {}, saved, Path(out))


def oneshot(
    model: str,
    out: str | Path | None = None,
    *,
    method: str = "thanos",
    pattern="2:4",
    options: dict | None = None,
    storage: str = "default",
    save_dtype_name: str = "auto",
    calib: str = "austen",
    calib_tokens: Path | None = None,
    calib_ids: torch.Tensor | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    batch_tokens: int = 8192,
    targets=None,
    ignore=None,
    eval_windows: int = 0,
    eval_data: str = "austen",
    eval_seqlen: int = 512,
    resume_run: bool = False,
    offload: bool | None = None,
    activations_on_disk: bool | None = None,
    overwrite: bool = False,
    loaded: tuple[nn.Module, object] | None = None,
    progress: bool = False,
    status=None,
    say=None,
    world: distributed.World | None = None,
) -> Result:
    """Prune `model` (a folder, hub id, .gguf or smollm2-135m; or `loaded` = (model, tokenizer),
    pruned in place, with `model` naming its source) and, given `out`, write the artifact in
    `storage` (masked, packed, shrunk or auto). Without `out` nothing is written: the pruned model
    comes back in the result, as `compare` needs it. `status(message)` is a context manager shown
    around each long step (the CLI passes a spinner); `say(line)` tells what was decided before the
    work starts (the widths a width pattern resolves to). Under torchrun (WORLD_SIZE > 1) this is
    one of several processes (`world`, default distributed.start): each calibrates on its share of
    the windows and process 0 writes and evaluates (pipeline/distributed.py)."""
    started = time.perf_counter()
    own_world = world is None
    world = world or distributed.start(device)
    try:
        result = _oneshot(model, out, world, started, method=method, pattern=pattern, options=options, storage=storage,
                        save_dtype_name=save_dtype_name, calib=calib, calib_tokens=calib_tokens, calib_ids=calib_ids, nsamples=nsamples,
                        seqlen=seqlen, seed=seed, dtype=dtype, batch_tokens=batch_tokens, targets=targets, ignore=ignore,
                        eval_windows=eval_windows, eval_data=eval_data, eval_seqlen=eval_seqlen, resume_run=resume_run, offload=offload,
                        activations_on_disk=activations_on_disk, overwrite=overwrite, loaded=loaded, progress=progress and world.rank == 0,
                        status=status if world.rank == 0 else None, say=say if world.rank == 0 else None)
    except BaseException:
        if own_world:
            distributed.finish(world, together=False)
        raise
    if own_world:
        distributed.finish(world)
    return result


def _oneshot(model, out, world: distributed.World, started: float, *, method, pattern, options, storage, save_dtype_name, calib, calib_tokens,
             calib_ids, nsamples, seqlen, seed, dtype, batch_tokens, targets, ignore, eval_windows, eval_data, eval_seqlen, resume_run,
             offload, activations_on_disk, overwrite, loaded, progress, status, say) -> Result:
    status = status or (lambda message: nullcontext())
    job = prepare(method, pattern, options, storage=storage, save_dtype_name=save_dtype_name, targets=targets, ignore=ignore)
    at_least(1, nsamples=nsamples, seqlen=seqlen, batch_tokens=batch_tokens, eval_seqlen=eval_seqlen)
    at_least(0, eval_windows=eval_windows)
    dev = world.device
    if out is not None:
        out = checkpoint.check_output(out, overwrite)
    if resume_run and out is None:
        raise UserError("--resume continues a run that writes an artifact: pass --out")
    if out is None and job.storage != "masked":
        raise UserError(f"{job.storage} storage is written to disk: pass an output folder, or keep the model in memory with storage='masked'")
    docs = None
    if calib_ids is None and calib_tokens is None:
        with status(f"reading calibration data '{calib}'"):
            docs = data.documents(calib, "calibration")  # a bad file fails here, before the model loads
    elif calib_ids is None:
        calib_ids = data.load_token_file(calib_tokens)
    offloaded = loaded is None and out is not None and wants_offload(model, offload, compatible=job.storage == "masked" and eval_windows == 0)
    if offloaded and job.storage != "masked":
        raise UserError(f"--offload writes masked checkpoints, not {job.storage}: drop --offload, or drop --shrink/--pack and run "
                        "`thanos-deploy shrink` or `pack` on the output")
    if offloaded and eval_windows > 0:
        raise UserError("--offload never holds the whole model, so it cannot evaluate it: drop --eval-windows and run `thanos-deploy eval` on the output")
    if offload and loaded is not None:
        raise UserError("--offload reads the model from its folder: pass the model's path, not a loaded model")

    with world.together():  # process 0 holds the run folder; the others keep their activations in it
        run = resume.RunFolder(out, resume=resume_run, overwrite=overwrite) if out is not None and world.rank == 0 else None
    with resume.guard(run, "thanos-deploy") if run else nullcontext():
        with world.together():
            net, tokenizer, weights, ids = _load(model, job, loaded=loaded, offloaded=offloaded, dtype=dtype, calib=calib, calib_ids=calib_ids,
                                                 calib_tokens=calib_tokens, nsamples=nsamples, seqlen=seqlen, seed=seed, docs=docs, status=status, say=say)
        calibration = {"source": str(calib_tokens) if calib_tokens is not None else calib, "seed": None if calib_tokens is not None else seed}
        evaluation = {}
        if eval_windows > 0 and world.rank == 0:
            with status("evaluating the dense model"):
                evaluation["dense"] = evaluate(net, tokenizer, eval_data, eval_seqlen, eval_windows, dev)
        fingerprint = {"model": model, **resume.model_identity(loading.resolve(model)), "dtype": str(next(net.parameters()).dtype),
                       "tokens_hash": data.token_hash(ids), "method": job.method.name, "pattern": str(job.pattern), "options": job.options,
                       "targets": list(job.targets), "ignore": list(job.ignore), "storage": job.storage, "save_dtype": save_dtype_name,
                       "batch_tokens": batch_tokens, "device": dev.type, "versions": versions()}
        distributed.check_same(world, {**fingerprint, "out": str(out), "resume": resume_run, "overwrite": overwrite, "eval_windows": eval_windows})
        on_disk = activations.wants_on_disk(activations_on_disk, net, ids)
        with world.together():  # process 0 records the fingerprint, or checks a resumed run's
            if run:
                run.start(fingerprint, net, weights=weights, write_dtype=job.save_dtype if job.storage == "masked" else None,
                          activations_on_disk=on_disk, processes=world.size)
        store = run if run or out is None else resume.Follower(resume.partial_folder(out), world.rank, net, weights=weights, activations_on_disk=on_disk)
        report = compress_model(net, ids, method=job.method.name, pattern=job.pattern, device=dev, batch_tokens=batch_tokens,
                                progress=progress, targets=list(job.targets), ignore=list(job.ignore), store=store, world=world, **job.options)
        if world.rank != 0:
            return Result(net, tokenizer, report, {}, out, process=world.rank)
        if eval_windows > 0:
            with status("evaluating the pruned model"):
                evaluation["pruned"] = evaluate(net, tokenizer, eval_data, eval_seqlen, eval_windows, dev)
        made = manifest(job, report, source_model=model, model=net, ids=ids, calibration=calibration, evaluation=evaluation,
                        seconds=time.perf_counter() - started)
        made = compact(net, made, job.storage, job.save_dtype)
        if run:
            with status(f"saving to {out}"):
                if job.storage == "masked":
                    run.finish(tokenizer, made, overwrite=overwrite)
                else:
                    checkpoint.save(net, tokenizer, out, made, overwrite=overwrite)
                    run.close(discard=True)
        if job.storage == "plain" and out is not None:
            net = loading.load(str(out))[0]  # the narrowed modules' own attributes (heads per group) come from the new config
    return Result(net, tokenizer, report, made, out)


def _load(model: str, job: Job, *, loaded, offloaded: bool, dtype: str, calib: str, calib_ids, calib_tokens, nsamples: int,
          seqlen: int, seed: int, docs, status, say):
    """(model, tokenizer, offloaded weights or None, calibration ids), checked against the job."""
    with status(f"loading {model}"):
        if loaded is not None:
            (net, tokenizer), weights = loaded, None
        elif offloaded:
            net, tokenizer, weights = load_skeleton(model, dtype=dtype)
        else:
            (net, tokenizer), weights = loading.load(model, dtype=dtype), None
    decided = check_model(net, job)
    if decided and say:
        say(decided)
    with status(f"tokenizing calibration data '{calib}'"):
        ids = calibration_ids(net, tokenizer, ids=calib_ids, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, docs=docs)
    return net, tokenizer, weights, ids


def fresh_copy(loaded: tuple[nn.Module, object]) -> tuple[nn.Module, object]:
    """A copy of a loaded (model, tokenizer) to prune, leaving the original dense."""
    return copy.deepcopy(loaded[0]), loaded[1]
