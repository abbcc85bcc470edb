"""Latency and throughput measurement: the grid, the interleaved schedule, the statistics.

Conventions (NVIDIA NIM / TensorRT-LLM / vLLM benchmarks): prefill latency is the time to the
first token's logits for a [batch, prompt] input; decode latency is the time of one step with the
KV cache (time per output token); throughput is tokens/s for each phase separately. Every figure
is reported as p50/p90/p99 after warm-up, and as a speed-up over dense (dense time / candidate
time) from the same run with a bootstrap confidence interval. Candidates run interleaved
(A B C A B C ...) inside every repetition, so slow drift of the machine hits all of them alike, and
the ratio of repetition i pairs dense's repetition i with the candidate's.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from ..runtime import open_backend

# ------------------------------------------------------------------------------ statistics


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default):
    h = (n-1)·q/100, value = x[⌊h⌋] + (h-⌊h⌋)·(x[⌈h⌉] - x[⌊h⌋]) over the sorted samples."""
    if not samples:
        raise ValueError("percentile of no samples")
    x = sorted(samples)
    h = (len(x) - 1) * q / 100
    lo, hi = math.floor(h), math.ceil(h)
    return x[lo] + (h - lo) * (x[hi] - x[lo])


def summarize(samples: list[float]) -> dict:
    return {"p50": percentile(samples, 50), "p90": percentile(samples, 90), "p99": percentile(samples, 99),
            "mean": statistics.fmean(samples), "n": len(samples)}


def speedup(dense: list[float], candidate: list[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Speed-up median(dense) / median(candidate) over paired repetitions, with a paired bootstrap
    interval: resample repetition indices with replacement (dense i stays with candidate i, both
    ran back to back), recompute the ratio, take the (1±confidence)/2 percentiles. Also the spread:
    min and max of the per-repetition ratios dense_i / candidate_i."""
    if len(dense) != len(candidate) or not dense:
        raise ValueError("speed-up needs the same, non-zero number of dense and candidate repetitions")
    n = len(dense)
    rng = random.Random(seed)
    boots = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(statistics.median(dense[i] for i in idx) / statistics.median(candidate[i] for i in idx))
    tail = (1 - confidence) / 2 * 100
    per_rep = [d / c for d, c in zip(dense, candidate)]
    return {
        "ratio": statistics.median(dense) / statistics.median(candidate),
        "low": percentile(boots, tail),
        "high": percentile(boots, 100 - tail),
        "confidence": confidence,
        "spread": [min(per_rep), max(per_rep)],
    }


# ------------------------------------------------------------------------------ grid and schedule


@dataclass(frozen=True)
class Grid:
    batch_sizes: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    decode_tokens: int
    repetitions: int

    @property
    def cells(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.batch_sizes for s in self.prompt_lengths]


def default_grid(device: str, quick: bool) -> Grid:
    """CPU: small batches (a 2-core machine); CUDA: the batch sizes where 2:4 starts to pay."""
    if device == "cuda":
        return Grid((1, 8), (512,), 32, 5) if quick else Grid((1, 8, 32), (128, 2048), 64, 10)
    return Grid((1, 4), (256,), 16, 5) if quick else Grid((1, 4), (128, 512), 32, 5)


def schedule(labels: list[str], cells: list[tuple[int, int]], repetitions: int) -> list[tuple[int, tuple[int, int], str]]:
    """(repetition, cell, label) in run order: per repetition and cell, every candidate once, in
    the same order (A B C A B C ...)."""
    return [(rep, cell, label) for rep in range(repetitions) for cell in cells for label in labels]


# ------------------------------------------------------------------------------ timing


def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """The same random prompt for every candidate (speed does not depend on the token values)."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed + 1000 * batch + length))


def time_one(backend, ids: torch.Tensor, decode_tokens: int) -> tuple[float, list[float]]:
    """Prefill once, then `decode_tokens` greedy steps with the KV cache; seconds of each.

    Backends return logits on the CPU, so every step is finished (synchronised) when it returns."""
    t0 = time.perf_counter()
    logits, state = backend.prefill(ids)
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(decode_tokens):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        logits, state = backend.decode(next_ids, state)
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def cell_key(cell: tuple[int, int]) -> str:
    return f"{cell[0]}x{cell[1]}"


def measure(backends: dict, vocab: int, grid: Grid, step=None) -> dict:
    """Raw timings {label: {"BxS": {"prefill": [s per rep], "decode": [[s per step] per rep]}}}.

    One untimed warm-up per candidate and cell, as long as a repetition (prefill and every decode
    step; with a two-step warm-up, one CPU run's first repetition was the slowest for every
    candidate), then the schedule."""
    labels = list(backends)
    raw = {label: {cell_key(c): {"prefill": [], "decode": []} for c in grid.cells} for label in labels}
    for cell in grid.cells:
        for label in labels:
            time_one(backends[label], prompt_ids(vocab, *cell), grid.decode_tokens)
            if step:
                step(f"warm-up {label} {cell_key(cell)}")
    for rep, cell, label in schedule(labels, grid.cells, grid.repetitions):
        prefill, steps = time_one(backends[label], prompt_ids(vocab, *cell), grid.decode_tokens)
        raw[label][cell_key(cell)]["prefill"].append(prefill)
        raw[label][cell_key(cell)]["decode"].append(steps)
        if step:
            step(f"rep {rep + 1}/{grid.repetitions} {label} {cell_key(cell)}")
    return raw


def summary(raw: dict, dense: str) -> dict:
    """Per label and cell: latency percentiles, tokens/s at p50, speed-ups over `dense` with intervals.

    Decode percentiles are over every step of every repetition; its speed-up pairs the mean step
    time of each repetition."""
    out = {}
    for label, cells in raw.items():
        out[label] = {}
        for key, t in cells.items():
            batch, length = (int(v) for v in key.split("x"))
            steps = [s for rep in t["decode"] for s in rep]
            d = raw[dense][key]
            row = {
                "prefill": summarize(t["prefill"]),
                "decode": summarize(steps),
                "prefill_tokens_per_s": batch * length / percentile(t["prefill"], 50),
                "decode_tokens_per_s": batch / percentile(steps, 50),
                "prefill_speedup": speedup(d["prefill"], t["prefill"]),
                "decode_speedup": speedup([statistics.fmean(r) for r in d["decode"]], [statistics.fmean(r) for r in t["decode"]]),
            }
            out[label][key] = row
    return out


# ------------------------------------------------------------------------------ peak memory


def _peak_child(kind: str, target: str, options: dict, vocab: int, batch: int, length: int, decode_tokens: int, threads: int) -> dict:
    """In a fresh process: open the backend, run the largest cell once, report the peaks.

    RSS is /proc's VmHWM (ru_maxrss would carry the parent's peak across fork and exec)."""
    torch.set_num_threads(threads)
    backend = open_backend(kind, target, **options)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    time_one(backend, prompt_ids(vocab, batch, length), decode_tokens)
    status = Path("/proc/self/status").read_text()
    rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return {"peak_rss_bytes": rss_kib * 1024, "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def peak_memory(kind: str, target: str, options: dict, vocab: int, grid: Grid) -> dict:
    """Peak memory of one candidate alone: RSS on CPU, torch.cuda.max_memory_allocated on CUDA."""
    batch, length = max(grid.batch_sizes), max(grid.prompt_lengths)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_peak_child, kind, str(target), options, vocab, batch, length, grid.decode_tokens, torch.get_num_threads()).result()
