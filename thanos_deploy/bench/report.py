"""What `bench` prints and writes: the speed and cost tables (Rich on the terminal, Markdown in
bench.md) and the one-line description of a run."""

from __future__ import annotations

from .. import tasks
from ..measure import markdown_table


def _speed(s: dict, flops: float | None = None) -> str:
    return f"{s['ratio']:.2f}× [{s['low']:.2f}, {s['high']:.2f}]" + (f" (FLOPs {flops:.2f}×)" if flops else "")


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:.0f} MiB"


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the speed table and the cost table; rendered as Markdown and by Rich."""
    speed_header = ["candidate", "batch×prompt", "prefill ms p50/p90/p99", "prefill tok/s", "prefill speed-up (model-FLOP ratio)",
                    "decode ms/token p50/p90/p99", "decode tok/s", "decode speed-up (model-FLOP ratio)"]
    speed_rows, cost_rows = [], []
    accuracy = tasks.columns(result["rows"])
    for row in result["rows"]:
        for key, s in row["speed"].items():
            p, d = s["prefill"], s["decode"]
            speed_rows.append([
                row["label"], key.replace("x", "×"), f"{p['p50'] * 1e3:.1f} / {p['p90'] * 1e3:.1f} / {p['p99'] * 1e3:.1f}",
                f"{s['prefill_tokens_per_s']:.0f}", _speed(s["prefill_speedup"], s.get("prefill_flop_ratio")),
                f"{d['p50'] * 1e3:.1f} / {d['p90'] * 1e3:.1f} / {d['p99'] * 1e3:.1f}", f"{s['decode_tokens_per_s']:.1f}", _speed(s["decode_speedup"], s.get("decode_flop_ratio")),
            ])
        ppl = row.get("perplexity")
        mem = row.get("memory") or {}
        secs = row.get("pruning_seconds") or {}
        largest = row["speed"][max(row["speed"], key=lambda k: tuple(int(v) for v in k.split("x")))]
        bound = largest.get("prefill_flop_ratio")
        cost_rows.append([
            row["label"], f"{ppl['perplexity']:.2f}" if ppl else "", *(tasks.cell(row, task, metric) for task, metric in accuracy), _mib(row["bytes"]),
            _mib(mem.get("cuda_max_allocated_bytes") or mem.get("peak_rss_bytes")),
            f"{bound:.2f}× (measured {largest['prefill_speedup']['ratio'] / bound:.2f} of it)" if bound else "", f"{secs['total']:.0f} s (math {secs['prune']:.0f} s)" if secs.get("total") is not None else "",
            row["what_ran"],
        ])
    memory = "peak CUDA memory" if result["device"] == "cuda" else "peak RSS"
    cost_header = ["candidate", "perplexity", *(f"{task} {metric}" for task, metric in accuracy), "on disk", memory, "model-FLOP ratio (prefill, largest cell)", "pruning", "what ran"]
    return [("speed (speed-up = dense time / candidate time, median of paired repetitions, 95% bootstrap interval)", speed_header, speed_rows),
            ("cost", cost_header, cost_rows)]


def describe(result: dict) -> str:
    g = result["grid"]
    m = result["machine"]
    where = m.get("gpu") or f"{m['processor']}, {m['torch_threads']} threads"
    return (f"{result['date']} · {where} · torch {m['versions'].get('torch')} · {g['repetitions']} interleaved repetitions after warm-up, "
            f"{g['decode_tokens']} decode steps each · `{result['command']}`")


def markdown(result: dict) -> str:
    lines = [describe(result), ""]
    for title, header, rows in tables(result):
        lines += [f"**{title}**", "", *markdown_table(header, rows), ""]
    return "\n".join(lines)
