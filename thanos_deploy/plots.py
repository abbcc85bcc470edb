"""The plots of `bench` and `compare`, drawn with matplotlib's Agg backend (files only, no display needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402


def latency_vs_batch(result: dict, path: Path) -> None:
    """Prefill and decode p50 latency against batch size, one line per candidate and prompt length."""
    fig, (prefill, decode) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in result["rows"]:
        by_prompt: dict[int, list] = {}
        for key, s in row["speed"].items():
            batch, length = (int(v) for v in key.split("x"))
            by_prompt.setdefault(length, []).append((batch, s["prefill"]["p50"] * 1e3, s["decode"]["p50"] * 1e3))
        for length, points in sorted(by_prompt.items()):
            points.sort()
            batches = [p[0] for p in points]
            name = row["label"] + (f" (prompt {length})" if len(by_prompt) > 1 else "")
            line = prefill.plot(batches, [p[1] for p in points], marker="o", label=name)[0]
            decode.plot(batches, [p[2] for p in points], marker="o", color=line.get_color(), label=name)
    lengths = sorted({int(k.split("x")[1]) for row in result["rows"] for k in row["speed"]})
    prefill.set(title=f"prefill latency (prompt {', '.join(map(str, lengths))} tokens)", xlabel="batch size", ylabel="ms (p50)")
    decode.set(title="decode latency per output token (KV cache)", xlabel="batch size", ylabel="ms per token (p50)")
    batch_sizes = sorted({int(k.split("x")[0]) for row in result["rows"] for k in row["speed"]})
    for ax in (prefill, decode):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.grid(alpha=0.3)
    decode.legend(fontsize=7, loc="best")
    fig.suptitle(result["machine"].get("gpu") or f"CPU, {result['machine']['torch_threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]], *, x_better: str) -> list[int]:
    """Indices of the points (x, perplexity) no other point beats on both axes, in order of x: lower
    perplexity and, as `x_better` says, higher x (a speed-up, a zero fraction) or lower x (seconds)."""
    sign = {"higher": 1, "lower": -1}[x_better]
    front = [i for i, (x, p) in enumerate(points)
             if not any((sign * x2 >= sign * x and p2 <= p) and (sign * x2 > sign * x or p2 < p) for x2, p2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def pareto(result: dict, path: Path) -> None:
    """Perplexity against prefill speed-up at the largest cell, one point per candidate (first
    backend), error bars from the bootstrap interval; the Pareto front as a line."""
    rows = [r for r in result["rows"] if r.get("perplexity") and r["backend"] == result["rows"][0]["backend"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if rows:
        key = max(rows[0]["speed"], key=lambda k: tuple(int(v) for v in k.split("x")))
        points = [(r["speed"][key]["prefill_speedup"]["ratio"], r["perplexity"]["perplexity"]) for r in rows]
        for r, (s, p) in zip(rows, points):
            su = r["speed"][key]["prefill_speedup"]
            ax.errorbar([s], [p], xerr=[[s - su["low"]], [su["high"] - s]], fmt="o", capsize=3)
            ax.annotate(r["label"], (s, p), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = pareto_front(points, x_better="higher")
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, label="Pareto front")
        ax.set(xlabel=f"prefill speed-up over dense at {key.replace('x', '×')} ({rows[0]['backend']})")
        ax.legend(fontsize=8)
    ax.set(ylabel="perplexity (lower is better)", title="quality vs speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoffs(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity against pruning seconds (and, when α varies, against the achieved zero fraction):
    one point per run, the Pareto front ringed and dashed, dense as a dotted line. A method with one run (the
    SparseGPT and Wanda references) is a labelled square; a swept method's points carry the options
    that vary between its runs."""
    pruned = [r for r in rows if r["method"] != "dense"]
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    panels = [("prune_seconds", "pruning math seconds (lower is better)", "lower")]
    if len({r["options"]["alpha"] for r in pruned if "alpha" in r["options"]}) > 1:
        panels.append(("sparsity", "achieved zero fraction of the pruned linears (higher is better)", "higher"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    runs_of = Counter(r["method"] for r in pruned)
    for ax, (key, xlabel, better) in zip(axes[0], panels):
        points = [(r[key], r["perplexity"]) for r in pruned]
        for method, count in runs_of.items():
            mine = [p for r, p in zip(pruned, points) if r["method"] == method]
            ax.scatter([x for x, _ in mine], [p for _, p in mine], marker="o" if count > 1 else "s", s=28, zorder=3, label=method)
        for r, point in zip(pruned, points):
            ax.annotate(_varying_options(r, pruned) if runs_of[r["method"]] > 1 else r["label"], point, textcoords="offset points",
                        xytext=(4, 3), fontsize=6 if runs_of[r["method"]] > 1 else 8)
        front = pareto_front(points, x_better=better)
        front_x, front_y = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.plot(front_x, front_y, "k--", lw=1, zorder=2)
        ax.scatter(front_x, front_y, s=110, facecolors="none", edgecolors="k", zorder=4, label="Pareto front")
        if dense is not None:
            ax.axhline(dense, color="grey", ls=":", lw=1, label=f"dense ({dense:.2f})")
        xs, ys = [x for x, _ in points], [p for _, p in points] + ([dense] if dense else [])
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
        if ys and max(ys) / min(ys) > 5:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.set(xlabel=xlabel, ylabel="perplexity (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovery_curves(curves: dict[str, list[dict]], path, title: str, dense: float | None = None) -> None:
    """Evaluation perplexity during `recover`, one line per run: against tokens trained and
    against wall-clock seconds (the log's 'tokens', 'seconds' and 'perplexity'); `path` may be a file object."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (ax, key, label) in zip(axes, ("tokens", "seconds"), ("tokens trained", "wall-clock seconds")):
        for name, log in curves.items():
            ax.plot([e[key] for e in log], [e["perplexity"] for e in log], marker="o", ms=3, label=name)
        if dense is not None:
            ax.axhline(dense, color="grey", ls=":", lw=1, label=f"dense ({dense:.2f})")
        ax.set(xlabel=label, ylabel="evaluation perplexity")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _plain_log_ticks(axis) -> None:
    """Ticks at 1, 2, 5 × 10^k labelled as plain numbers (matplotlib's default labels every minor
    tick of a short log axis as 2×10⁰, 3×10⁰, ..., which overlap)."""
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _varying_options(row: dict, rows: list[dict]) -> str:
    """The options of `row` that differ between the runs of its method: what tells its points apart."""
    others = [r["options"] for r in rows if r["method"] == row["method"]]
    varying = [k for k, v in row["options"].items() if any(o.get(k) != v for o in others)]
    return " ".join(f"{k}={row['options'][k]:g}" for k in varying)
