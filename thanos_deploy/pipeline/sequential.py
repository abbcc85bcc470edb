"""The sequential layer loop shared by every method (the SparseGPT / Wanda / Thanos pipeline).

1. Capture the inputs of decoder layer 0 for all calibration windows (in batches).
2. For each decoder layer, in order, a straight line:
   collect  run the dense layer on its inputs while hooks sum the statistics of every linear;
   solve    prune the linears with the method (or, with a width pattern, the layer's units);
   share    hand every process the new weights (nothing to do for one process);
   forward  run the pruned layer to produce the inputs of the next layer.

The loop owns all its state (`LayerInputs` and the report list), so a `store` (resume.RunFolder)
can restore it after layer i, read offloaded layers from disk, and keep the hidden states between
layers on disk (activations.py) without touching the methods. With several processes (World,
distributed.py) each takes its share of the windows, the statistics are summed in rank order and
each linear is solved on one process.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data, models, width
from ..errors import UserError
from ..loading import pick_device
from ..patterns import Width
from ..progress import SILENT, Bar, Reporter
from ..request import Execution, Pruning
from ..targets import select
from . import activations, numerics
from .distributed import World
from .hooks import InputStats

ERROR_SAMPLE_TOKENS = 4096  # methods without a Hessian report their error on about this many tokens


@dataclass
class LayerInputs:
    """What flows from one decoder layer to the next, one entry per calibration batch. `hidden` is a
    list, or an activations.OnDisk that reads one batch at a time; the other arguments (positions,
    masks) are small and stay in memory."""

    hidden: list[torch.Tensor] | activations.OnDisk
    args: list[tuple]
    kwargs: list[dict]

    def run(self, layer: nn.Module) -> Iterator[torch.Tensor]:
        """The layer's output for each batch, computed (and its input read) only when asked for."""
        for hidden, args, kwargs in zip(self.hidden, self.args, self.kwargs):
            out = layer(hidden, *args, **kwargs)
            yield out[0] if isinstance(out, (tuple, list)) else out

    def feed(self, layer: nn.Module, collector: InputStats) -> None:
        """The statistics pass: every batch through `layer`, for the hooks of `collector` only."""
        for hidden, args, kwargs in zip(self.hidden, self.args, self.kwargs):
            collector.feed(layer, hidden, args, kwargs)


@dataclass
class LayerJob:
    """What pruning one decoder layer needs besides its inputs: the linears chosen in it, or (width
    pattern) its units and the widths, and the calibration tokens of all processes together."""

    index: int
    linears: dict[str, nn.Linear]
    tokens: int
    units: width.Units | None = None
    widths: width.Widths | None = None

    def where(self, name: str = "") -> str:
        return f"layers.{self.index}" + (f".{name}" if name else "")


class Clock:
    """Seconds of each stage of a layer, without the time spent in exchanges between processes
    (reported apart as `communication`)."""

    def __init__(self, world: World):
        self.world, self.seconds = world, {}
        self.t0, self.c0 = time.perf_counter(), world.seconds
        self.t, self.c = self.t0, self.c0

    def lap(self, stage: str) -> None:
        now, spent = time.perf_counter(), self.world.seconds
        self.seconds[stage] = round(now - self.t - (spent - self.c), 4)
        self.t, self.c = now, spent

    def report(self) -> dict:
        communication = {} if self.world.single else {"communication": round(self.world.seconds - self.c0, 4)}
        return {**self.seconds, **communication}


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, *, device, batch_tokens: int = 8192, spill: Path | None = None) -> LayerInputs:
    """Run the model up to decoder layer 0 and keep what reaches it, batch by batch: in memory, or
    the hidden states in the file `spill` as they come."""
    layers = models.decoder_layers(model)
    outside = _modules_outside(model, layers)
    home = next(model.parameters()).device
    _move(outside, device)

    def stop(module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    chunks = ids.split(data.batch_size(ids.shape[1], batch_tokens))
    positional, keywords = [], []
    try:
        with activations.keep(spill, len(chunks)) as hidden:
            for chunk in chunks:
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Captured as c:
                    args, kwargs = tuple(c.args_), dict(c.kwargs_)
                    hidden.append(args[0] if args else kwargs.pop("hidden_states"))
                    positional.append(args[1:])
                    keywords.append(kwargs)
                else:
                    raise RuntimeError("decoder layer 0 was never called")
    finally:
        handle.remove()
        _move(outside, home)
    return LayerInputs(hidden.batches(), positional, keywords)


@torch.no_grad()
def prune_layer(layer: nn.Module, inputs: LayerInputs, pruning: Pruning, job: LayerJob, *, world: World = World(),
                spill: Path | None = None, bar: Bar = Bar()) -> tuple[dict, LayerInputs]:
    """Prune one decoder layer in place; return (its report, the inputs of the next layer, in
    memory or, given `spill`, in that file)."""
    clock = Clock(world)
    stats = collect(layer, inputs, pruning, job, world)
    clock.lap("statistics")
    owner = world.assign({name: _solve_cost(linear, pruning) for name, linear in job.linears.items()}) if job.units is None \
        else dict.fromkeys(job.linears, 0)  # units are chosen over the whole layer: on process 0
    with world.together():
        entries, kept = solve(layer, stats, pruning, job, owner, world.rank, bar)
    clock.lap("prune")
    entries, kept = share(entries, kept, job, owner, world)
    report = {"index": job.index, "linears": entries, "groups": stats.groups(), **({"units": kept} if kept is not None else {})}
    del stats
    with world.together():
        inputs = forward(layer, inputs, spill, job.where())
    clock.lap("forward")
    return {**report, "seconds": clock.report()}, inputs


def collect(layer: nn.Module, inputs: LayerInputs, pruning: Pruning, job: LayerJob, world: World) -> InputStats:
    """The statistics of every chosen linear over this process's windows, summed over the processes."""
    collector = InputStats(job.linears, hessian=pruning.method.needs_hessian, sample_every=max(1, job.tokens // ERROR_SAMPLE_TOKENS))
    with world.together():
        try:
            inputs.feed(layer, collector)
        finally:
            collector.close()
    world.sum_statistics(collector)
    return collector


def solve(layer: nn.Module, stats: InputStats, pruning: Pruning, job: LayerJob, owner: dict[str, int], rank: int, bar: Bar):
    """Prune, in place, the linears `owner` gives this process; with a width pattern, choose and
    prune the layer's units (on process 0). Returns (report entries, units kept or None)."""
    if job.units is None:
        entries = []
        for name, linear in job.linears.items():
            if owner[name] == rank:
                bar.describe(f"{pruning.label} · layer {job.index}.{name}")
                entries.append(_prune_linear(linear, stats[name], pruning, job.where(name), name))
        return entries, None
    for name in (job.units.mlp_consumer, job.units.attn_consumer):
        numerics.check_statistics(stats[name], job.where(name))
    if rank != 0:
        return [], None
    t0 = time.perf_counter()
    kept, before = width.prune_units(pruning.method, pruning.options, job.units, layer, stats.__getitem__, job.widths)
    seconds = (time.perf_counter() - t0) / len(before)
    entries = []
    for name, weight in before.items():
        new = layer.get_submodule(name).weight.data
        numerics.check_weight(new, job.where(name))
        entries.append(_entry(name, weight, new, stats[name], seconds))
    return entries, kept


def share(entries: list[dict], kept: dict | None, job: LayerJob, owner: dict[str, int], world: World):
    """Every process gets every new weight and the whole report; nothing to do for one process."""
    if world.single:
        return entries, kept
    world.share_weights(job.linears, owner)
    order = {name: i for i, name in enumerate(job.linears)}
    entries = sorted((e for part in world.gather(entries) for e in part), key=lambda e: order.get(e["name"], len(order)))
    return entries, world.broadcast(kept)


def forward(layer: nn.Module, inputs: LayerInputs, spill: Path | None, where: str) -> LayerInputs:
    """The layer's outputs for every batch: the inputs of the next layer, in memory or in `spill`."""
    with activations.keep(spill, len(inputs.hidden)) as outputs:
        for out in inputs.run(layer):
            numerics.check_output(out, where)
            outputs.append(out)
    return LayerInputs(outputs.batches(), inputs.args, inputs.kwargs)


def _solve_cost(linear: nn.Linear, pruning: Pruning) -> float:
    """What pruning one linear costs, roughly: the Hessian methods' solves grow as out x in², the others as out x in."""
    out, inp = linear.weight.shape
    return out * inp * (inp if pruning.method.needs_hessian else 1)


def _prune_linear(linear: nn.Linear, stats, pruning: Pruning, where: str, name: str) -> dict:
    """Prune one linear in place; its report entry."""
    weight = linear.weight.data
    numerics.check_statistics(stats, where)
    t1 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numerics.warn_rank_deficient(stats, weight.shape[1])
        try:
            new = pruning.method.prune(weight, stats, pruning.pattern, **pruning.options)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    numerics.check_weight(new, where)
    if new.is_cuda:
        torch.cuda.synchronize(new.device)
    entry = _entry(name, weight, new, stats, time.perf_counter() - t1)
    if caught:
        entry["warnings"] = [f"{where}: {w.message}" for w in caught]
    linear.weight.data = new.to(weight.dtype)
    return entry


def _entry(name: str, weight: torch.Tensor, new: torch.Tensor, stats, seconds: float) -> dict:
    return {"name": name, "shape": list(weight.shape), "sparsity": float((new == 0).float().mean()),
            "relative_error": stats.relative_error(weight, new), "error_tokens": stats.error_tokens, "seconds": round(seconds, 4)}


def compress_model(model: nn.Module, calib_ids: torch.Tensor, pruning: Pruning, execution: Execution = Execution(), *,
                   store=None, world: World | None = None, reporter: Reporter = SILENT) -> dict:
    """Prune `model` in place, decoder layer by decoder layer, as `pruning` (a checked
    request.Pruning) says; return the report.

    `calib_ids` is a [n, seqlen] token tensor. Embeddings and the LM head are never pruned. One
    decoder layer at a time is moved to the device (`execution.device`, or the world's). `store`
    (resume.RunFolder) checkpoints after every layer, restores a killed run, reads offloaded
    layers and says where the hidden states between layers live (`store.spill`: memory or a
    file). `world` (distributed.start) runs this as one of several processes: each takes its
    share of the windows, and process 0's `store` writes (the others' is a resume.Follower).
    """
    world = world or World(device=pick_device(execution.device))
    layers = models.decoder_layers(model)
    chosen = select(model, pruning)
    widths = width.plan(pruning.pattern, model.config) if isinstance(pruning.pattern, Width) else None
    units = width.check_model(model, widths) if widths else None
    device = world.device or next(model.parameters()).device
    if len(calib_ids) < world.size:
        raise UserError(f"{len(calib_ids)} calibration windows cannot be shared by {world.size} processes: use --nsamples {world.size} or more")

    t0 = time.perf_counter()
    spill = store.spill if store else lambda index: None
    if store and store.bounds_memory:
        activations.free_large_blocks_at_once()
    inputs = capture_inputs(model, calib_ids[world.share(len(calib_ids))], device=device, batch_tokens=execution.batch_tokens, spill=spill(0))
    if world.single and (store is None or store.kept_hidden):
        start, reports, inputs = store.restore(layers, inputs) if store else (0, [], inputs)
    else:  # several processes now or in the run resumed: the hidden states are recomputed
        start, reports = world.broadcast((store.done, store.progress["reports"]) if store and world.rank == 0 else None) or (0, [])
        if start:
            inputs = _replay(layers[:start], inputs, store, device, spill)
    with reporter.bar(pruning.label, total=len(layers)) as bar:
        bar.advance(start)
        for i, layer in enumerate(layers):
            if i < start:
                continue
            if store:
                store.load(i, layer)
            home = next(layer.parameters()).device
            layer.to(device)
            job = LayerJob(i, chosen[i], calib_ids.numel(), units[i] if units else None, widths)
            report, inputs = prune_layer(layer, inputs, pruning, job, world=world, spill=spill(i + 1), bar=bar)
            layer.to(home)
            reports.append(report)
            if store:
                store.save(i, layer, report, inputs)
            bar.advance()
    world.gather(None)  # every process is done with the run folder before process 0 completes it
    return summarize(reports, pruning, world, time.perf_counter() - t0)


def _replay(done: list[nn.Module], inputs: LayerInputs, store, device, spill) -> LayerInputs:
    """A resumed distributed run: the hidden states reaching the first unfinished layer, recomputed
    by every process for its windows through the finished layers read back from the run folder
    (the windows may be shared differently than before, so none were kept)."""
    for i, layer in enumerate(done):
        store.load_finished(i, layer)
        home = next(layer.parameters()).device
        layer.to(device)
        inputs = forward(layer, inputs, spill(i + 1), f"layers.{i}")
        layer.to(home)
        store.forget(i, layer)
    return inputs


def summarize(reports: list[dict], pruning: Pruning, world: World, seconds: float) -> dict:
    zeros = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for r in reports for e in r["linears"])
    total = sum(e["shape"][0] * e["shape"][1] for r in reports for e in r["linears"])
    stage = {k: round(sum(r["seconds"].get(k, 0.0) for r in reports), 3) for k in ("statistics", "prune", "forward", "communication")}
    if not any("communication" in r["seconds"] for r in reports):
        del stage["communication"]
    return {
        "method": pruning.method.name,
        "pattern": str(pruning.pattern),
        "options": pruning.options,
        "sparsity": zeros / total if total else 0.0,
        "seconds": {"total": round(seconds, 3), **stage},
        "layers": reports,
        **({"world": world.size} if not world.single else {}),
        "targets": list(pruning.targets),
        "ignore": list(pruning.ignore),
    }


def _modules_outside(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    inside = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def _move(modules: list[nn.Module], device) -> None:
    """Move the modules' own tensors, leaving those not read (on meta: an offloaded run's head) where they are."""
    for m in modules:
        for p in m.parameters(recurse=False):
            if not p.is_meta:
                p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            if not b.is_meta:
                m._buffers[name] = b.to(device)
