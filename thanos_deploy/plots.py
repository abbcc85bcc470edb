"""The two `bench` plots, drawn with matplotlib's Agg backend (files only, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher speed-up, lower perplexity),
    in order of speed-up."""
    front = [i for i, (s, p) in enumerate(points)
             if not any((s2 >= s and p2 <= p) and (s2 > s or p2 < p) for s2, p2 in points)]
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
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, label="Pareto front")
        ax.set(xlabel=f"prefill speed-up over dense at {key.replace('x', '×')} ({rows[0]['backend']})")
        ax.legend(fontsize=8)
    ax.set(ylabel="perplexity (lower is better)", title="quality vs speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
