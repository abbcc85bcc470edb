"""The one entry point that prunes a model and writes the artifact. The CLI's `compress`, `compare`,
`bench --plan` and the Python API all go through `oneshot`, which takes a checked request
(request.py) and trusts it:

1. what needs no model: the output path, the calibration file, a width pattern against the config;
2. load (or take a loaded model), then what needs it: targets, shapes, units, tokens, windows;
3. prune layer by layer (pipeline/sequential.py), resumable when writing a masked artifact;
4. evaluate (optional), cast for saving, compact (shrink / pack / plain), build the manifest;
5. write through the staging folder, published in one rename (artifact.py, staging.py).

    result = oneshot(prepare("smollm2-135m", out="out/m", method="thanos", pattern="2:4", storage="packed"))
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import data, loading, models, width
from .artifact import Manifest, check_output, save, versions
from .compact.pack import pack_model
from .compact.plain import plain_config
from .compact.shrink import shrink_model
from .errors import UserError
from .evaluate import evaluate
from .patterns import Width, parse_pattern
from .pipeline import activations, distributed, resume
from .pipeline.offload import load_skeleton, wants_offload
from .pipeline.sequential import compress_model
from .progress import SILENT, Reporter
from .request import Calibration, CompressRequest, Output, storage_for
from .staging import guard
from .targets import select


@dataclass
class Result:
    model: nn.Module
    tokenizer: object
    report: dict  # per layer and linear: sparsity, errors, seconds (pipeline.sequential.compress_model)
    manifest: Manifest | None  # as written (or as it would be, when nothing was written); None on processes other than 0
    out: Path | None
    process: int = 0  # this process's rank in a run of several (process 0 writes and reports)


def oneshot(request: CompressRequest, *, loaded: tuple[nn.Module, object] | None = None, ids: torch.Tensor | None = None,
            world: distributed.World | None = None, reporter: Reporter = SILENT) -> Result:
    """Prune `request.model` and, when the request has an output folder, write the artifact in its
    storage; without one nothing is written and the pruned model comes back in the result (as
    `compare` needs it). `loaded` = (model, tokenizer) is pruned in place instead of loading the
    model; `ids` are calibration windows already drawn. Under torchrun (WORLD_SIZE > 1) this is
    one of several processes (`world`, default distributed.start): each calibrates on its share
    of the windows and process 0 writes, evaluates and reports (pipeline/distributed.py)."""
    started = time.perf_counter()
    own_world = world is None
    world = world or distributed.start(request.execution.device)
    try:
        result = _oneshot(request, world, loaded, ids, reporter if world.rank == 0 else SILENT, started)
    except BaseException:
        if own_world:
            distributed.finish(world, together=False)
        raise
    if own_world:
        distributed.finish(world)
    return result


def _oneshot(request: CompressRequest, world: distributed.World, loaded, ids, reporter: Reporter, started: float) -> Result:
    output, execution, evaluation = request.output, request.execution, request.evaluation
    out = check_output(output.out, output.overwrite) if output.out is not None else None
    if execution.offload and loaded is not None:
        raise UserError("--offload reads the model from its folder: pass the model's path, not a loaded model")
    docs = None
    if ids is None and request.calibration.tokens is None:
        with reporter.status(f"reading calibration data '{request.calibration.source}'"):
            docs = data.documents(request.calibration.source, "calibration")  # a bad file fails here, before the model loads
    if loaded is None:
        check_config(loading.load_config(request.model)[1], request)
    offloaded = loaded is None and out is not None and wants_offload(request.model, execution.offload, compatible=request.offload_allowed)

    with world.together():  # process 0 holds the run folder; the others keep their activations in it
        run = resume.RunFolder(out, resume=output.resume, overwrite=output.overwrite) if out is not None and world.rank == 0 else None
    with guard(run):
        with world.together():
            net, tokenizer, weights, ids = _load(request, loaded, offloaded, ids, docs, reporter)
        scores = {}
        if evaluation.windows and world.rank == 0:
            with reporter.status("evaluating the dense model"):
                scores["dense"] = evaluate(net, tokenizer, evaluation.data, evaluation.seqlen, evaluation.windows, world.device)
        fingerprint = _fingerprint(request, net, ids, world)
        distributed.check_same(world, {**fingerprint, "out": str(out), "resume": output.resume, "overwrite": output.overwrite,
                                       "eval_windows": evaluation.windows})
        on_disk = activations.wants_on_disk(execution.activations_on_disk, net, ids)
        with world.together():  # process 0 records the fingerprint, or checks a resumed run's
            if run:
                run.start(fingerprint, net, weights=weights, write_dtype=output.dtype if output.storage == "masked" else None,
                          activations_on_disk=on_disk, processes=world.size)
        store = run if run or out is None else resume.Follower(out, world.rank, net, weights=weights, activations_on_disk=on_disk)
        report = compress_model(net, ids, request.pruning, execution, store=store, world=world, reporter=reporter)
        if world.rank != 0:
            return Result(net, tokenizer, report, None, out, process=world.rank)
        if evaluation.windows:
            with reporter.status("evaluating the pruned model"):
                scores["pruned"] = evaluate(net, tokenizer, evaluation.data, evaluation.seqlen, evaluation.windows, world.device)
        calibration = {**request.calibration.describe(), "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "tokens_hash": data.token_hash(ids)}
        made = Manifest.compressed(report, source_model=request.model, dtype=next(net.parameters()).dtype, calibration=calibration,
                                   evaluation=scores, seconds=time.perf_counter() - started)
        made = compact(net, made, output.storage, output.dtype)
        if run:
            with reporter.status(f"saving to {out}"):
                if output.storage == "masked":
                    made = run.finish(tokenizer, made, overwrite=output.overwrite)
                else:
                    made = save(net, tokenizer, out, made, overwrite=output.overwrite)
                    run.close(discard=True)
        if output.storage == "plain" and out is not None:
            net = loading.load(str(out))[0]  # the narrowed modules' own attributes (heads per group) come from the new config
    return Result(net, tokenizer, report, made, out)


def check_config(config, request: CompressRequest) -> None:
    """What can be checked against the config alone, before the weights load: a width pattern's
    widths (whole units, counts the family's config accepts)."""
    if isinstance(request.pruning.pattern, Width):
        width.plan(request.pruning.pattern, config)


def check_model(model: nn.Module, request: CompressRequest, reporter: Reporter = SILENT) -> None:
    """The checks of a request against the model, before any work: targets and shapes; for a width
    pattern, its units in every layer and (written plain) the config that builds the new widths.
    What a width pattern resolves to is said to the user."""
    select(model, request.pruning)
    pattern = request.pruning.pattern
    if not isinstance(pattern, Width):
        return
    widths = width.plan(pattern, model.config)
    units = width.check_model(model, widths)
    if request.output.storage == "plain":
        width.plain_config(model, units, widths)
    reporter.say(f"{pattern}: {widths.describe()}")
    if advice := widths.advice():
        reporter.warn(advice)


def calibration_ids(model: nn.Module, tokenizer, calibration: Calibration, *, ids: torch.Tensor | None = None,
                    docs: list[str] | None = None) -> torch.Tensor:
    """Calibration windows [n, seqlen] for `model`: `ids` as given, read from the token file, or
    drawn from the text source with windows capped at the model's context; checked against its
    vocabulary and context."""
    if ids is not None:
        pass
    elif calibration.tokens is not None:
        ids = data.load_token_file(calibration.tokens)
    else:
        ids = data.calibration_tokens(calibration.source, tokenizer, nsamples=calibration.nsamples,
                                      seqlen=models.context_length(model, calibration.seqlen), seed=calibration.seed, docs=docs)
    data.check_tokens(ids, model.config.vocab_size)
    if models.context_length(model, ids.shape[1]) < ids.shape[1]:
        raise UserError(f"calibration windows of {ids.shape[1]} tokens exceed this model's maximum of {models.context_length(model, ids.shape[1])}")
    return ids


def _load(request: CompressRequest, loaded, offloaded: bool, ids, docs, reporter: Reporter):
    """(model, tokenizer, offloaded weights or None, calibration ids), checked against the request."""
    with reporter.status(f"loading {request.model}"):
        if loaded is not None:
            (net, tokenizer), weights = loaded, None
        elif offloaded:
            net, tokenizer, weights = load_skeleton(request.model, dtype=request.execution.dtype, head=False)
        else:
            (net, tokenizer), weights = loading.load(request.model, dtype=request.execution.dtype), None
    check_model(net, request, reporter)
    with reporter.status(f"tokenizing calibration data '{request.calibration.source}'"):
        ids = calibration_ids(net, tokenizer, request.calibration, ids=ids, docs=docs)
    return net, tokenizer, weights, ids


def _fingerprint(request: CompressRequest, net: nn.Module, ids: torch.Tensor, world: distributed.World) -> dict:
    """Everything that decides the artifact's bytes: a resumed run must match it."""
    pruning = request.pruning
    return {"model": request.model, **resume.model_identity(loading.resolve(request.model)), "dtype": str(next(net.parameters()).dtype),
            "tokens_hash": data.token_hash(ids), "method": pruning.method.name, "pattern": str(pruning.pattern), "options": pruning.options,
            "targets": list(pruning.targets), "ignore": list(pruning.ignore), "storage": request.output.storage,
            "save_dtype": request.output.save_dtype, "batch_tokens": request.execution.batch_tokens, "device": world.device.type,
            "versions": versions()}


def compact(model: nn.Module, manifest: Manifest, storage: str, dtype: torch.dtype | None = None) -> Manifest:
    """Cast for saving, then shrink, pack or narrow in place; returns the manifest to save. A shrunk
    model whose MLPs all narrowed alike is recorded with `plain`: stock transformers loads it."""
    if dtype is not None:
        model.to(dtype)
    if storage == "masked":
        return manifest.compacted("masked", dtype=dtype)
    pattern = parse_pattern(manifest.pattern)
    if storage == "plain":
        widths = width.plan(pattern, model.config)
        kept = [layer["units"] for layer in manifest.layers]
        changed = width.narrow(model, width.check_model(model, widths), kept, widths)
        return manifest.compacted("plain", dtype=dtype, plain=changed, units={f"layers.{i}": k for i, k in enumerate(kept)})
    alpha = (manifest.options or {}).get("alpha") or 0.0
    modules = shrink_model(model, alpha=alpha) if storage == "shrunk" else pack_model(model, pattern, alpha=alpha)
    plain = plain_config(model, modules) if storage == "shrunk" else None
    return manifest.compacted(storage, dtype=dtype, modules=modules, **({"plain": plain} if plain else {}))


def convert(source: str, output: Output, pattern: str | None = None) -> Result:
    """`shrink` / `pack` (output.storage shrunk or packed) of a masked artifact written earlier, or
    of a folder pruned elsewhere described by `pattern`."""
    check_output(output.out, output.overwrite)
    folder = Path(source)
    found = Manifest.read(folder) if folder.is_dir() else None
    if found is None or found.pattern is None:
        if pattern is None:
            where = f"'{source}' has no thanos_deploy.json" if found is None else f"'{source}/thanos_deploy.json' does not say the pattern"
            raise UserError(f"{where}: pass --pattern to say how it was pruned")
        found = replace(found, pattern=pattern) if found else Manifest.external(source, pattern)
    elif pattern is not None and parse_pattern(pattern) != parse_pattern(found.pattern):
        raise UserError(f"--pattern {pattern} disagrees with the checkpoint's pattern {found.pattern}")
    if found.storage != "masked":
        raise UserError(f"'{source}' is already {found.storage}: {output.storage} works on masked checkpoints")
    storage_for(parse_pattern(found.pattern), output.storage)
    net, tokenizer = loading.load(source)
    made = save(net, tokenizer, output.out, compact(net, replace(found, files={}), output.storage, output.dtype), overwrite=output.overwrite)
    return Result(net, tokenizer, {}, made, output.out)


def default_out(model: str, method: str, pattern: str) -> Path:
    """A new folder in the current directory named after the model, method and pattern; never an existing one."""
    stem = Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name
    base = re.sub(r"[^\w.]+", "-", f"{stem}-{method}-{pattern}").strip("-")
    candidate, n = Path(base), 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate


class Sweep:
    """Several runs of one model on one calibration set (`compare`, `bench --plan`): the model is
    loaded once and the windows drawn once, every run is checked against the model before the
    first one starts, and each run prunes a fresh copy."""

    def __init__(self, requests: list[CompressRequest], reporter: Reporter = SILENT):
        first = requests[0]
        self.reporter = reporter
        with reporter.status(f"loading {first.model}"):
            self.model, self.tokenizer = loading.load(first.model, dtype=first.execution.dtype)
        with reporter.status(f"tokenizing calibration data '{first.calibration.source}'"):
            self.ids = calibration_ids(self.model, self.tokenizer, first.calibration)
        for request in requests:  # a target that matches nothing, or a shape that does not fit, fails before any work
            check_model(self.model, request)

    def run(self, request: CompressRequest) -> Result:
        return oneshot(request, loaded=(copy.deepcopy(self.model), self.tokenizer), ids=self.ids, reporter=self.reporter)
