"""The sequential layer loop shared by every method (SparseGPT / Wanda / Thanos pipeline).

1. Capture the inputs of decoder layer 0 for all calibration windows (in batches).
2. For each decoder layer, in order: run the dense layer on its inputs while hooks accumulate the
   statistics of every linear (one accumulator per distinct input), prune every linear with the
   method, then run the pruned layer to produce the inputs of the next layer.

The loop owns all its state (`LayerInputs` and the report list), so a `store` (resume.RunFolder)
can restore it after layer i, read offloaded layers from disk, and keep the hidden states between
layers on disk (activations.py) without touching the methods.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .. import models, width
from ..errors import UserError
from ..methods import get_method
from ..patterns import Width, parse_pattern
from ..targets import select
from . import activations, numerics
from .distributed import World
from .stats import InputStats


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


ERROR_SAMPLE_TOKENS = 4096  # methods without a Hessian report their error on about this many tokens


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


def _modules_outside(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    inside = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def _move(modules: list[nn.Module], device) -> None:
    for m in modules:
        for p in m.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            m._buffers[name] = b.to(device)


def batch_size(seqlen: int, batch_tokens: int) -> int:
    return max(1, batch_tokens // seqlen)


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
    chunks = ids.split(batch_size(ids.shape[1], batch_tokens))
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
def prune_layer(layer: nn.Module, inputs: LayerInputs, method, pattern, options: dict, *, index: int = 0, on_linear=None, subs=None,
                spill: Path | None = None, units: width.Units | None = None, widths: width.Widths | None = None,
                world: World | None = None, tokens: int | None = None):
    """Prune the linears `subs` (default: every linear) of one decoder layer in place, or with a
    width pattern its `units`; return (report, inputs of the next layer), whose hidden states are
    in memory or, given `spill`, in that file. With a `world` of several processes, `inputs` are
    this process's windows of `tokens` calibration tokens in all (distributed.py)."""
    world = world or World()
    t0, c0 = time.perf_counter(), world.seconds  # world.seconds: time in exchanges, taken out of the stages
    subs = models.linears(layer) if subs is None else subs
    tokens = tokens or sum(shape[0] * shape[1] for shape in activations.shapes(inputs.hidden))
    collector = InputStats(subs, hessian=method.needs_hessian, sample_every=max(1, tokens // ERROR_SAMPLE_TOKENS))
    with world.together():
        try:
            inputs.feed(layer, collector)
        finally:
            collector.close()
    world.sum_statistics(collector)
    t_stats = time.perf_counter() - t0 - (world.seconds - c0)

    report = {"index": index, "linears": [], "groups": collector.groups()}
    if units is not None:  # the units are chosen over the whole layer: process 0 does it, the others take its weights
        owner = dict.fromkeys(subs, 0)
        for name in (units.mlp_consumer, units.attn_consumer):
            numerics.check_statistics(collector[name], f"layers.{index}.{name}")
    else:
        owner = world.assign({name: _solve_cost(linear, method) for name, linear in subs.items()})
    t1, c1 = time.perf_counter(), world.seconds
    with world.together():
        if units is None:
            for name, linear in subs.items():
                if owner[name] == world.rank:
                    report["linears"].append(_prune_linear(linear, collector[name], method, pattern, options, f"layers.{index}.{name}", on_linear, name))
        elif world.rank == 0:
            report["units"], before = width.prune_units(method, options, units, layer, collector.__getitem__, widths)
            seconds = (time.perf_counter() - t1) / len(before)
            for name, weight in before.items():
                new = layer.get_submodule(name).weight.data
                numerics.check_weight(new, f"layers.{index}.{name}")
                report["linears"].append(_entry(name, weight, new, collector[name], seconds))
    t_prune = time.perf_counter() - t1 - (world.seconds - c1)
    if not world.single:
        world.share_weights(subs, owner)
        report["linears"] = _in_order([e for part in world.gather(report["linears"]) for e in part], subs)
        report["units"] = world.broadcast(report.get("units"))
        if report["units"] is None:
            del report["units"]
    del collector
    t2, c2 = time.perf_counter(), world.seconds
    with world.together():
        inputs = forward(layer, inputs, spill, f"layers.{index}")
    t_forward = time.perf_counter() - t2 - (world.seconds - c2)
    report["seconds"] = {"statistics": round(t_stats, 4), "prune": round(t_prune, 4), "forward": round(t_forward, 4)}
    if not world.single:  # exchanges and waits for slower processes
        report["seconds"]["communication"] = round(world.seconds - c0, 4)
    return report, inputs


def forward(layer: nn.Module, inputs: LayerInputs, spill: Path | None, where: str) -> LayerInputs:
    """The layer's outputs for every batch: the inputs of the next layer, in memory or in `spill`."""
    with activations.keep(spill, len(inputs.hidden)) as outputs:
        for out in inputs.run(layer):
            numerics.check_output(out, where)
            outputs.append(out)
    return LayerInputs(outputs.batches(), inputs.args, inputs.kwargs)


def _solve_cost(linear: nn.Linear, method) -> float:
    """What pruning one linear costs, roughly: the Hessian methods' solves grow as out x in², the others as out x in."""
    out, inp = linear.weight.shape
    return out * inp * (inp if method.needs_hessian else 1)


def _prune_linear(linear: nn.Linear, stats, method, pattern, options: dict, where: str, on_linear, name: str) -> dict:
    """Prune one linear in place; its report entry."""
    if on_linear:
        on_linear(name)
    weight = linear.weight.data
    numerics.check_statistics(stats, where)
    t1 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numerics.warn_rank_deficient(stats, weight.shape[1])
        try:
            new = method.prune(weight, stats, pattern, **options)
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


def _in_order(entries: list[dict], subs: dict) -> list[dict]:
    order = {name: i for i, name in enumerate(subs)}
    return sorted(entries, key=lambda e: order.get(e["name"], len(order)))


def compress_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    method: str,
    pattern,
    device=None,
    batch_tokens: int = 8192,
    progress: bool = False,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    store=None,
    world: World | None = None,
    **options,
) -> dict:
    """Prune `model` in place, decoder layer by decoder layer; return the report.

    `calib_ids` is a [n, seqlen] token tensor. Embeddings and the LM head are never pruned. One
    decoder layer at a time is moved to `device` (default: where the model is). `targets` and
    `ignore` pick the linears by module name (targets.py); default: every decoder linear. `store`
    (a resume.RunFolder) checkpoints after every layer, restores a killed run, reads offloaded
    layers and says where the hidden states between layers live (`store.spill`: memory or a file).
    `world` (distributed.start) runs this as one of several processes: each takes its share of the
    windows, and process 0's `store` writes (the others' is a resume.Follower).
    """
    world = world or World()
    m = get_method(method)
    pattern = parse_pattern(pattern)
    opts = m.options(pattern, options)
    layers = models.decoder_layers(model)
    chosen = select(model, targets, ignore, pattern)
    widths = units = None
    if isinstance(pattern, Width):
        if targets or ignore:
            raise UserError("width patterns remove whole units from every decoder layer alike: drop --targets/--ignore")
        widths = width.plan(pattern, model.config)
        units = width.check_model(model, widths)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if len(calib_ids) < world.size:
        raise UserError(f"{len(calib_ids)} calibration windows cannot be shared by {world.size} processes: use --nsamples {world.size} or more")

    t0 = time.perf_counter()
    spill = store.spill if store else lambda index: None
    if store and store.bounds_memory:
        activations.free_large_blocks_at_once()
    inputs = capture_inputs(model, calib_ids[world.share(len(calib_ids))], device=device, batch_tokens=batch_tokens, spill=spill(0))
    if world.single and (store is None or store.kept_hidden):
        start, reports, inputs = store.restore(layers, inputs) if store else (0, [], inputs)
    else:  # several processes now or in the run resumed: the hidden states are recomputed
        start, reports = world.broadcast((store.done, store.progress["reports"]) if store and world.rank == 0 else None) or (0, [])
        if start:
            inputs = _replay(layers[:start], inputs, store, device, spill)
    bar = _progress(progress and world.rank == 0)
    with bar or nullcontext():
        task = bar.add_task(f"{m.name} {pattern}", total=len(layers)) if bar else None
        if bar and start:
            bar.advance(task, start)
        for i, layer in enumerate(layers):
            if i < start:
                continue
            if store:
                store.load(i, layer)
            home = next(layer.parameters()).device
            layer.to(device)
            on_linear = (lambda name, i=i: bar.update(task, description=f"{m.name} {pattern} · layer {i}.{name}")) if bar else None
            report, inputs = prune_layer(layer, inputs, m, pattern, opts, index=i, on_linear=on_linear, subs=chosen[i], spill=spill(i + 1),
                                         units=units[i] if units else None, widths=widths, world=world, tokens=calib_ids.numel())
            layer.to(home)
            reports.append(report)
            if store:
                store.save(i, layer, report, inputs)
            if bar:
                bar.advance(task)
    world.gather(None)  # every process is done with the run folder before process 0 completes it
    total = time.perf_counter() - t0
    summary = summarize(reports, method=m.name, pattern=str(pattern), options=opts, seconds=total)
    if not world.single:
        summary["world"] = world.size
    return {**summary, "targets": list(targets or []), "ignore": list(ignore or [])}


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


def summarize(reports: list[dict], *, method: str, pattern: str, options: dict, seconds: float) -> dict:
    zeros = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for r in reports for e in r["linears"])
    total = sum(e["shape"][0] * e["shape"][1] for r in reports for e in r["linears"])
    stage = {k: round(sum(r["seconds"].get(k, 0.0) for r in reports), 3) for k in ("statistics", "prune", "forward", "communication")}
    if not any("communication" in r["seconds"] for r in reports):
        del stage["communication"]
    return {
        "method": method,
        "pattern": pattern,
        "options": options,
        "sparsity": zeros / total if total else 0.0,
        "seconds": {"total": round(seconds, 3), **stage},
        "layers": reports,
    }


def _progress(enabled: bool):
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
