"""The `bench` pipeline: artifacts (given, or built from a plan) → backends → measurements → files.

Everything is checked before any work (artifacts, backends, vocabularies, the plan, --out); the
output folder is written through a temporary folder renamed at the end, so an error or Ctrl-C
leaves nothing half-written; intermediate artifacts (pruned checkpoints, exports) live in a
temporary working folder that is removed.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoConfig

from .. import data, loading, measure, plots, tasks
from ..artifact import check_output, staged
from ..errors import UserError
from ..evaluate import backend_perplexity
from ..loading import pick_device
from ..progress import SILENT, Reporter
from ..request import Calibration, Evaluation, Execution, Tasks
from ..runtime import open_backend
from . import artifacts, report, timing
from . import plan as plans


def _rows(arts: list[artifacts.Artifact], backends: list[str] | None) -> list[tuple[str, artifacts.Artifact, str]]:
    """(row label, artifact, backend): every artifact on every requested backend; by default each
    candidate on its own, and the dense model (arts[0]) on each of those, so that every speed-up is
    against the dense model on the same backend (a .gguf candidate: the dense model exported to GGUF)."""
    if backends:
        per_artifact = {id(art): backends for art in arts}
    else:
        used = list(dict.fromkeys(artifacts.NATIVE[art.kind] for art in arts[1:])) or [artifacts.NATIVE[arts[0].kind]]
        per_artifact = {id(art): [artifacts.NATIVE[art.kind]] for art in arts[1:]} | {id(arts[0]): used}
    several = len({b for chosen in per_artifact.values() for b in chosen}) > 1
    rows = []
    for art in arts:
        for backend in per_artifact[id(art)]:
            artifacts.check_route(art, backend)
            rows.append((f"{art.label} [{backend}]" if several else art.label, art, backend))
    return sorted(rows, key=lambda row: [b for _, _, b in rows].index(row[2]))  # grouped by backend, the dense row first in each


QUICK = (Calibration(nsamples=16, seqlen=256), Evaluation(windows=8, seqlen=256))
FULL = (Calibration(nsamples=64, seqlen=512), Evaluation(windows=32, seqlen=512))


def bench(
    dense: str,
    candidates: list[str],
    out: Path,
    *,
    plan: str | None = None,
    backends: list[str] | None = None,
    execution: Execution = Execution(device="cpu"),
    quick: bool = False,
    grid: dict | None = None,
    calibration: dict | None = None,
    evaluation: dict | None = None,
    accuracy: Tasks = Tasks(),
    peak_memory: bool = True,
    overwrite: bool = False,
    command: str = "",
    reporter: Reporter = SILENT,
) -> dict:
    """Measure dense and every candidate; write bench.json, bench.md, latency.png, pareto.png to `out`.
    `grid` (batch_sizes, prompt_lengths, decode_tokens, repetitions), `calibration` (of --plan)
    and `evaluation` change what they name of the defaults: the device's grid and 64×512
    calibration and 32×512 evaluation tokens, or with `quick` a small grid, 16×256 and 8×256.
    `accuracy`: lm-eval tasks run on each artifact that has a torch row."""
    device = pick_device(execution.device).type
    grid_asked = grid or {}
    grid = replace(timing.default_grid(device, quick), **grid_asked)
    presets = QUICK if quick else FULL
    calibration = replace(presets[0], **(calibration or {}))
    evaluation = replace(presets[1], **(evaluation or {}))
    if min(grid.batch_sizes + grid.prompt_lengths) < 1 or grid.decode_tokens < 1 or grid.repetitions < 2:
        raise UserError("batch sizes, prompt lengths and --decode-tokens must be at least 1, --reps at least 2")
    for backend in backends or []:
        artifacts.check_backend(backend, device)
    grid = _one_sequence(grid, backends or [], grid_asked=grid_asked)
    if accuracy:
        tasks.check(list(accuracy.names))
    check_output(out, overwrite)
    step = reporter.step
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="thanos-bench-") as work:
        workdir = Path(work)
        if plan is not None:
            if candidates:
                raise UserError("--plan builds its own candidates: pass only the model, or drop --plan")
            runs = plans.read_plan(plan)
            artifacts.check_backend("torch", device)
            arts = [artifacts.identify(dense, "dense")]
            windows = _eval_windows(arts[0], evaluation)
            _rows(arts, backends)
            folders = plans.build(dense, runs, workdir, calibration, replace(execution, device=device), reporter)
            arts = [artifacts.identify(str(folder), label) for label, folder in folders.items()]
        else:
            if not candidates:
                raise UserError("nothing to compare: pass DENSE and at least one CANDIDATE, or MODEL --plan default")
            arts = [artifacts.identify(dense, "dense")] + [artifacts.identify(c) for c in candidates]
            _unique_labels(arts)
            windows = _eval_windows(arts[0], evaluation)
        rows = _rows(arts, backends)
        for _, _, backend in rows:
            artifacts.check_backend(backend, device)
        grid = _one_sequence(grid, [backend for _, _, backend in rows], grid_asked=grid_asked)
        vocab = arts[0].vocab()
        for art in arts[1:]:
            if vocab is not None and art.vocab() not in (None, vocab):
                raise UserError(f"'{art.path}' has a vocabulary of {art.vocab()} tokens, the dense model {vocab}: compare models of one family and tokenizer")

        runners, targets, facts = {}, {}, {}
        gguf = artifacts.gguf_type(arts)
        for label, art, backend in rows:
            step(f"preparing {label}")
            targets[label] = artifacts.prepare(art, backend, workdir, device, gguf=gguf)
            runners[label] = open_backend(backend, str(targets[label]), **artifacts.backend_options(backend, device, execution.dtype))
            logits, _ = runners[label].prefill(torch.zeros(1, 2, dtype=torch.long))
            vocab = vocab or logits.shape[-1]
            if logits.shape[-1] != vocab:
                raise UserError(f"'{art.path}' produces {logits.shape[-1]} logits per token, the dense model {vocab}: compare models of one family and tokenizer")
            ran, sparse_kernels = artifacts.what_ran(art, backend, device, runners[label], targets[label])
            facts[label] = {"artifact": str(art.path), "kind": art.kind, "backend": backend, "target": str(targets[label]) if targets[label] != art.path else None,
                            "bytes": artifacts.bytes_on_disk(targets[label]), "pruning_seconds": artifacts.pruning_seconds(art),
                            **{key: getattr(art.manifest, key) if art.manifest else None for key in ("pattern", "method", "storage")},
                            "what_ran": ran,
                            "linear_macs_per_token": _macs(art, runners[label], sparse_kernels),
                            "attention_macs_per_position": _attention_macs(art, runners[label])}

        scored = {}
        for label, art, _ in rows:
            if windows is not None and art.label not in scored:
                step(f"perplexity {label}")
                scored[art.label] = backend_perplexity(runners[label], windows)
            facts[label]["perplexity"] = scored.get(art.label)
        measured = {}
        for label, art, _ in rows:  # task accuracy needs a torch model: the first torch row of each artifact gives it
            if accuracy and art.label not in measured and hasattr(runners[label], "model"):
                step(f"tasks {label}")
                measured[art.label] = tasks.run(runners[label].model, runners[label].tokenizer, list(accuracy.names),
                                                num_fewshot=accuracy.num_fewshot, limit=accuracy.limit)
            facts[label]["tasks"] = measured.get(art.label)

        raw = timing.measure(runners, vocab, grid, step=step)
        speeds = {}
        for backend in dict.fromkeys(b for _, _, b in rows):
            group = [label for label, _, b in rows if b == backend]
            speeds.update(timing.summary({k: raw[k] for k in group}, group[0]))
            for label in group:
                facts[label]["dense"] = group[0]
                for key, s in speeds[label].items():  # prefill attends to (L+1)/2 positions on average, decode to L + (T+1)/2
                    length = int(key.split("x")[1])
                    s["prefill_flop_ratio"] = measure.flop_ratio(facts[group[0]], facts[label], (length + 1) / 2)
                    s["decode_flop_ratio"] = measure.flop_ratio(facts[group[0]], facts[label], length + (grid.decode_tokens + 1) / 2)
        del runners
        if peak_memory:
            for label, art, backend in rows:
                step(f"peak memory {label}")
                facts[label]["memory"] = timing.peak_memory(backend, targets[label], artifacts.backend_options(backend, device, execution.dtype), vocab, grid)

        result = {
            "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": measure.machine(),
            "device": device, "grid": asdict(grid), "plan": plan, "seconds": round(time.perf_counter() - started, 1),
            "rows": [{"label": label, **facts[label], "speed": speeds[label]} for label, _, _ in rows],
            "raw": raw,
        }
        with staged(out, overwrite) as tmp:
            (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "bench.md").write_text(report.markdown(result))
            plots.latency_vs_batch(result, tmp / "latency.png")
            plots.pareto(result, tmp / "pareto.png")
    return result


def _one_sequence(grid: timing.Grid, backends: list[str], *, grid_asked: dict) -> timing.Grid:
    """llama.cpp runs one sequence at a time here: a bench with a llamacpp row times batch 1."""
    if "llamacpp" not in backends:
        return grid
    if max(grid_asked.get("batch_sizes") or (1,)) > 1:
        raise UserError("--backend llamacpp runs one sequence at a time: pass --batch-sizes 1, or leave it out")
    return replace(grid, batch_sizes=(1,))


def _unique_labels(arts: list[artifacts.Artifact]) -> None:
    seen: dict[str, int] = {}
    for art in arts:
        seen[art.label] = seen.get(art.label, 0) + 1
        if seen[art.label] > 1:
            art.label = f"{art.label}#{seen[art.label]}"


def _macs(art: artifacts.Artifact, runner, sparse_kernels: bool) -> float | None:
    """Linear multiply-adds per token; from the torch model itself, or the checkpoint an export came from."""
    if hasattr(runner, "model"):
        return measure.linear_macs(runner.model, sparse_kernels)
    if art.kind == "checkpoint":
        return measure.linear_macs(loading.load(str(art.path))[0], sparse_kernels)
    return None


def _attention_macs(art: artifacts.Artifact, runner) -> float | None:
    config = runner.model.config if hasattr(runner, "model") else (AutoConfig.from_pretrained(art.config_folder) if art.config_folder else None)
    return measure.attention_macs_per_position(config) if config is not None else None


def _eval_windows(dense: artifacts.Artifact, evaluation: Evaluation):
    if evaluation.windows < 1:
        return None
    try:
        tokenizer = dense.tokenizer()
    except (OSError, ValueError, TypeError):
        raise UserError(f"no tokenizer next to '{dense.path}' for the perplexity: pass --eval-windows 0 to skip it") from None
    return data.windows(data.evaluation_tokens(evaluation.data, tokenizer), evaluation.seqlen, evaluation.windows)
