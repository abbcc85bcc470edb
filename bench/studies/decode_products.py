"""Why structured pruning pays less at decode on CPU: one-token matrix-vector products.

    python bench/studies/decode_products.py [--threads 1]

For SmolLM2's linear shapes, times F.linear of one token against a weight [rows, cols] and against
the same weight with a third of its columns removed (what structured:0.3 does), with weights
streamed from memory (60 distinct copies per shape, as in a real decode step), and the same
products with the weight stored transposed ([cols, rows] contiguous). Prints each time and the
ratios measured in this one run: if time followed bytes, "cols ×2/3" would be 0.67×. Then the same
products as the torch runtime runs them on CPU (`runtime/threaded.py`: the weight's rows split over
the threads, one batched product), at 1, 4 and 16 rows (its limit), against F.linear on the same
weights.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from thanos_deploy.runtime.threaded import threaded_linear

COPIES, REPS = 60, 7


def best_time(fn, copies: int = COPIES) -> float:
    """Best of REPS passes over `copies` weights, per product, in microseconds."""
    best = float("inf")
    for _ in range(REPS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / copies * 1e6


def product_times(rows: int, cols: int, tokens: int, ways: tuple[str, ...]) -> dict[str, float]:
    """Microseconds per product of `tokens` rows through a [rows, cols] weight, each way asked for:
    "row-major" (F.linear), "column-major" (F.linear on column-major storage), "threaded"."""
    copies = max(4, min(COPIES, 2**30 // (rows * cols * 4)))  # at most 1 GiB of weights (the LM head)
    x = torch.randn(tokens, cols)
    weights = [torch.randn(rows, cols) for _ in range(copies)]
    times = {}
    for way in ways:
        product = threaded_linear if way == "threaded" else F.linear
        stored = [w.t().contiguous().t() for w in weights] if way == "column-major" else weights  # same values
        times[way] = best_time(lambda: [product(x, w) for w in stored], copies)
    return times


def gb_per_s(rows: int, cols: int, microseconds: float) -> float:
    """Weight bytes read per second, in GB/s."""
    return rows * cols * 4 / microseconds / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), up to {COPIES} weights streamed per shape, best of {REPS}; first table one token")
    print("| weight | row-major µs | cols ×2/3 µs (ratio) | column-major µs (ratio to row-major) |")
    print("|---|---|---|---|")
    for rows, cols in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        full = product_times(rows, cols, 1, ("row-major", "column-major"))
        pruned = product_times(rows, cols * 2 // 3, 1, ("row-major",))
        print(f"| {rows}×{cols} | {full['row-major']:.0f} | {pruned['row-major']:.0f} ({pruned['row-major'] / full['row-major']:.2f}×) "
              f"| {full['column-major']:.0f} ({full['column-major'] / full['row-major']:.2f}×) |")
    print()
    print("| weight | tokens | F.linear µs (GB/s) | threaded µs (GB/s, ratio to F.linear) | threaded, cols ×2/3 µs (ratio to threaded) |")
    print("|---|---|---|---|---|")
    for rows, cols in ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)):
        for tokens in (1, 4, 16):
            full = product_times(rows, cols, tokens, ("row-major", "threaded"))
            pruned = product_times(rows, cols * 2 // 3, tokens, ("threaded",))
            print(f"| {rows}×{cols} | {tokens} | {full['row-major']:.0f} ({gb_per_s(rows, cols, full['row-major']):.1f}) "
                  f"| {full['threaded']:.0f} ({gb_per_s(rows, cols, full['threaded']):.1f}, {full['threaded'] / full['row-major']:.2f}×) "
                  f"| {pruned['threaded']:.0f} ({pruned['threaded'] / full['threaded']:.2f}×) |")


if __name__ == "__main__":
    main()
