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
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from thanos_deploy import checkpoint, data, loading
from thanos_deploy.errors import UserError
from thanos_deploy.evaluate import backend_perplexity
from thanos_deploy.loading import pick_device
from thanos_deploy.runtime import open_backend

from . import artifacts, plan as plans, plots, report, timing


def _rows(arts: list[artifacts.Artifact], backends: list[str] | None) -> list[tuple[str, artifacts.Artifact, str]]:
    """(row label, artifact, backend): every artifact on every requested backend (default: its own)."""
    rows = []
    for art in arts:
        for backend in backends or [artifacts.NATIVE[art.kind]]:
            artifacts.check_route(art, backend)
            rows.append((art.label if not backends or len(backends) == 1 else f"{art.label} [{backend}]", art, backend))
    return rows


def bench(
    dense: str,
    candidates: list[str],
    out: Path,
    *,
    plan: str | None = None,
    backends: list[str] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    quick: bool = False,
    batch_sizes: tuple[int, ...] = (),
    prompt_lengths: tuple[int, ...] = (),
    decode_tokens: int | None = None,
    reps: int | None = None,
    calib: str = "austen",
    calib_tokens: Path | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    eval_data: str = "austen",
    eval_windows: int | None = None,
    eval_seqlen: int | None = None,
    peak_memory: bool = True,
    overwrite: bool = False,
    command: str = "",
    on_step=None,
) -> dict:
    """Measure dense and every candidate; write bench.json, bench.md, latency.png, pareto.png to `out`.
    Unset sizes take the device's default grid, and `quick` a small one with small calibration and
    evaluation sets (16×256 and 8×256 tokens, else 64×512 and 32×512)."""
    device = pick_device(device).type
    default = timing.default_grid(device, quick)
    grid = timing.Grid(batch_sizes or default.batch_sizes, prompt_lengths or default.prompt_lengths,
                       default.decode_tokens if decode_tokens is None else decode_tokens, default.repetitions if reps is None else reps)
    nsamples, seqlen = nsamples or (16 if quick else 64), seqlen or (256 if quick else 512)
    eval_windows = (8 if quick else 32) if eval_windows is None else eval_windows
    eval_seqlen = eval_seqlen or (256 if quick else 512)
    if min(grid.batch_sizes + grid.prompt_lengths) < 1 or grid.decode_tokens < 1 or grid.repetitions < 2:
        raise UserError("batch sizes, prompt lengths and --decode-tokens must be at least 1, --reps at least 2")
    for backend in backends or []:
        artifacts.check_backend(backend, device)
    checkpoint.check_output(out, overwrite)
    step = on_step or (lambda message: None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="thanos-bench-") as work:
        workdir = Path(work)
        if plan is not None:
            if candidates:
                raise UserError("--plan builds its own candidates: pass only the model, or drop --plan")
            runs = plans.read_plan(plan)
            artifacts.check_backend("torch", device)
            arts = [artifacts.identify(dense, "dense")]
            windows = _eval_windows(arts[0], eval_data, eval_windows, eval_seqlen)
            _rows(arts, backends)
            folders = plans.build(dense, runs, workdir, calib=calib, calib_tokens=calib_tokens, nsamples=nsamples, seqlen=seqlen,
                                       seed=seed, device=device, on_run=lambda label: step(f"pruning {label}"))
            arts = [artifacts.identify(str(folder), label) for label, folder in folders.items()]
        else:
            if not candidates:
                raise UserError("nothing to compare: pass DENSE and at least one CANDIDATE, or MODEL --plan default")
            arts = [artifacts.identify(dense, "dense")] + [artifacts.identify(c) for c in candidates]
            _unique_labels(arts)
            windows = _eval_windows(arts[0], eval_data, eval_windows, eval_seqlen)
        rows = _rows(arts, backends)
        for _, _, backend in rows:
            artifacts.check_backend(backend, device)
        vocab = arts[0].vocab()
        for art in arts[1:]:
            if vocab is not None and art.vocab() not in (None, vocab):
                raise UserError(f"'{art.path}' has a vocabulary of {art.vocab()} tokens, the dense model {vocab}: compare models of one family and tokenizer")

        runners, targets, facts = {}, {}, {}
        for label, art, backend in rows:
            step(f"preparing {label}")
            targets[label] = artifacts.prepare(art, backend, workdir, device)
            runners[label] = open_backend(backend, str(targets[label]), **artifacts.backend_options(backend, device, dtype))
            logits, _ = runners[label].prefill(torch.zeros(1, 2, dtype=torch.long))
            vocab = vocab or logits.shape[-1]
            if logits.shape[-1] != vocab:
                raise UserError(f"'{art.path}' produces {logits.shape[-1]} logits per token, the dense model {vocab}: compare models of one family and tokenizer")
            ran, sparse_kernels = artifacts.what_ran(art, backend, device, runners[label], targets[label])
            facts[label] = {"artifact": str(art.path), "kind": art.kind, "backend": backend, "target": str(targets[label]) if targets[label] != art.path else None,
                            "bytes": artifacts.bytes_on_disk(targets[label]), "pruning_seconds": artifacts.pruning_seconds(art),
                            "pattern": (art.manifest or {}).get("pattern"), "method": (art.manifest or {}).get("method"),
                            "storage": (art.manifest or {}).get("storage"), "what_ran": ran,
                            "linear_macs_per_token": _macs(art, runners[label], sparse_kernels),
                            "attention_macs_per_position": _attention_macs(art, runners[label])}

        scored = {}
        for label, art, _ in rows:
            if windows is not None and art.label not in scored:
                step(f"perplexity {label}")
                scored[art.label] = backend_perplexity(runners[label], windows)
            facts[label]["perplexity"] = scored.get(art.label)

        raw = timing.measure(runners, vocab, grid, on_step=step)
        speeds = {}
        for backend in dict.fromkeys(b for _, _, b in rows):
            group = [label for label, _, b in rows if b == backend]
            speeds.update(timing.summary({k: raw[k] for k in group}, group[0]))
            for label in group:
                facts[label]["dense"] = group[0]
                for key, s in speeds[label].items():  # prefill attends to (L+1)/2 positions on average, decode to L + (T+1)/2
                    length = int(key.split("x")[1])
                    s["prefill_flop_ratio"] = artifacts.flop_ratio(facts[group[0]], facts[label], (length + 1) / 2)
                    s["decode_flop_ratio"] = artifacts.flop_ratio(facts[group[0]], facts[label], length + (grid.decode_tokens + 1) / 2)
        del runners
        if peak_memory:
            for label, art, backend in rows:
                step(f"peak memory {label}")
                facts[label]["memory"] = timing.peak_memory(backend, targets[label], artifacts.backend_options(backend, device, dtype), vocab, grid)

        result = {
            "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": timing.machine(),
            "device": device, "grid": asdict(grid), "plan": plan, "seconds": round(time.perf_counter() - started, 1),
            "rows": [{"label": label, **facts[label], "speed": speeds[label]} for label, _, _ in rows],
            "raw": raw,
        }
        with checkpoint.staged(out, overwrite) as tmp:
            (tmp / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "bench.md").write_text(report.markdown(result))
            plots.latency_vs_batch(result, tmp / "latency.png")
            plots.pareto(result, tmp / "pareto.png")
    return result


def _unique_labels(arts: list[artifacts.Artifact]) -> None:
    seen: dict[str, int] = {}
    for art in arts:
        seen[art.label] = seen.get(art.label, 0) + 1
        if seen[art.label] > 1:
            art.label = f"{art.label}#{seen[art.label]}"


def _macs(art: artifacts.Artifact, runner, sparse_kernels: bool) -> float | None:
    """Linear multiply-adds per token; from the torch model itself, or the checkpoint an export came from."""
    if hasattr(runner, "model"):
        return artifacts.linear_macs(runner.model, sparse_kernels)
    if art.kind == "checkpoint":
        return artifacts.linear_macs(loading.load(str(art.path))[0], sparse_kernels)
    return None


def _attention_macs(art: artifacts.Artifact, runner) -> float | None:
    config = runner.model.config if hasattr(runner, "model") else (AutoConfig.from_pretrained(art.config_folder) if art.config_folder else None)
    return artifacts.attention_macs_per_position(config) if config is not None else None


def _eval_windows(dense: artifacts.Artifact, source: str, count: int, seqlen: int):
    if count < 1:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(dense.config_folder)
    except (OSError, ValueError, TypeError):
        raise UserError(f"no tokenizer next to '{dense.path}' for the perplexity: pass --eval-windows 0 to skip it") from None
    return data.windows(data.evaluation_tokens(source, tokenizer), seqlen, count)
