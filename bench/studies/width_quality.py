"""Width pruning against structured:0.3 at equal decoder parameters (≈ 0.7× dense), on SmolLM2.

    python bench/studies/width_quality.py            # the quality protocol: 64 × 512 calibration, 64 × 512 evaluation
    python bench/studies/width_quality.py --quick    # 16 × 256 calibration, 16 × 512 evaluation: a check

Rows: Thanos structured:0.3 α = 0 (input columns of every linear), Thanos width MLP-only, and width
MLP + heads with Thanos, SparseGPT (left-to-right update), and the no-update baselines Wanda,
magnitude and Minitron's activation importance. The widths are chosen so every variant keeps the
same decoder parameters as structured:0.3 (printed).

Then the two reductions that go beyond the width patterns, measured here to decide whether they
belong in the product, both one-shot with no update as their published forms are:
- depth: drop the 9 of 30 layers that change their input least (ShortGPT's block influence,
  1 − cos(layer input, layer output) averaged over calibration tokens);
- hidden: keep 403 of 576 residual channels, ranked by Minitron's importance (the energy of every
  norm's output in that channel over calibration tokens), sliced out of the embedding, every norm
  and every linear.

Writes bench/results/width-quality[-quick].json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from thanos_deploy import data, loading
from thanos_deploy.compare import Run, compare
from thanos_deploy.evaluate import perplexity
from thanos_deploy.measure import markdown_table
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.request import Calibration, Evaluation, Execution
from thanos_deploy.width import plan

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads in 3 KV groups of head_dim 64. structured:0.3
# keeps 0.7 of every linear's inputs (0.60 once shrunk: see decoder_parameters); the widths keep 0.70
# of the decoder parameters (to 0.1 %), as does structured:0.2155 once shrunk.
VARIANTS = [
    ("structured:0.3", "thanos:alpha=0"),
    ("structured:0.2155", "thanos:alpha=0"),  # deployed (shrunk) at 0.70 of dense, like the width rows
    ("width:intermediate_size=922", "thanos"),
    ("width:intermediate_size=1050,num_attention_heads=6", "thanos"),
    ("width:intermediate_size=1050,num_attention_heads=6", "sparsegpt"),
    ("width:intermediate_size=1050,num_attention_heads=6", "wanda"),
    ("width:intermediate_size=1050,num_attention_heads=6", "magnitude"),
    ("width:intermediate_size=1050,num_attention_heads=6", "activation"),
]
DROPPED_LAYERS, KEPT_HIDDEN = 9, 403  # 21/30 = 0.700 and 403/576 = 0.700 of the decoder's parameters


def decoder_parameters(config, pattern: str) -> tuple[float, float]:
    """Decoder-linear parameters (nominal, deployed) as fractions of dense. They differ for
    structured:P at α = 0: down_proj loses a fraction P of its inputs, so the same fraction of
    gate/up rows produce values nothing reads, and `shrink` removes them too (before its rounding
    to multiples of 8): deployed = 0.5·(1-P) + 0.5·(1-P)² of a Llama layer's linears."""
    (mlp, heads, kv), d = (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads), config.hidden_size // config.num_attention_heads
    h = config.hidden_size
    attention, up, down = h * (heads * d + 2 * kv * d) + heads * d * h, 2 * h * mlp, h * mlp
    p = parse_pattern(pattern)
    if pattern.startswith("structured:"):
        x = 1 - p.sparsity
        return x, (attention * x + up * x * x + down * x) / (attention + up + down)
    new_mlp, new_heads, new_kv = plan(p, config).new
    kept = (h * (new_heads * d + 2 * new_kv * d) + new_heads * d * h + 3 * h * new_mlp) / (attention + up + down)
    return kept, kept


@torch.no_grad()
def drop_layers(model, ids: torch.Tensor, count: int) -> list[int]:
    """Remove the `count` layers with the lowest block influence; returns the removed indices."""
    hidden = model(ids, output_hidden_states=True).hidden_states
    influence = [1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item() for a, b in zip(hidden[:-1], hidden[1:])]
    dropped = sorted(sorted(range(len(influence)), key=influence.__getitem__)[:count])
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in dropped]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    model.model.layers = nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    return dropped


@torch.no_grad()
def narrow_hidden(model, ids: torch.Tensor, width: int) -> None:
    """Keep the `width` residual channels whose norm outputs carry the most energy (Minitron), no update."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    energy = torch.zeros(model.config.hidden_size, dtype=torch.float64)

    def add(module, inputs, out) -> None:
        energy.add_(out.double().pow(2).sum((0, 1)))

    hooks = [n.register_forward_hook(add) for n in norms]
    model(ids)
    for h in hooks:
        h.remove()
    keep = energy.argsort(descending=True)[:width].sort().values
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight = nn.Parameter(module.weight[:, keep].clone())
            module.embedding_dim = width
        elif module in norms:
            module.weight = nn.Parameter(module.weight[keep].clone())
    for name, module in model.model.layers.named_modules():
        if name.endswith(("o_proj", "down_proj")):  # they write the residual stream
            module.weight, module.out_features = nn.Parameter(module.weight[keep].clone()), width
        elif name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):  # they read it
            module.weight, module.in_features = nn.Parameter(module.weight[:, keep].clone()), width
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    model.lm_head.in_features = width
    model.config.hidden_size = width


def beyond_width(protocol: dict, reference: float) -> list[dict]:
    """Depth and hidden pruning at the same decoder parameters, one-shot, no update."""
    model, tokenizer = loading.load(loading.SMOLLM2_ALIAS)
    ids = data.calibration_tokens("austen", tokenizer, nsamples=protocol["nsamples"], seqlen=protocol["seqlen"], seed=0)
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), 512, protocol["eval_windows"])
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    rows = []
    for pattern, label, reduce, fraction in (
        (f"depth: {layers - DROPPED_LAYERS} of {layers} layers", "block influence", lambda m: drop_layers(m, ids, DROPPED_LAYERS), 1 - DROPPED_LAYERS / layers),
        (f"hidden_size={KEPT_HIDDEN}", "activation", lambda m: narrow_hidden(m, ids, KEPT_HIDDEN), KEPT_HIDDEN / hidden),
    ):
        pruned = loading.load(loading.SMOLLM2_ALIAS)[0]
        t0 = time.perf_counter()
        removed = reduce(pruned)
        seconds = time.perf_counter() - t0
        row = {"pattern": pattern, "label": label, "decoder_parameters": fraction, "deployed_parameters": fraction, "seconds": round(seconds, 2),
               **({"dropped_layers": removed} if removed else {}), **perplexity(pruned, windows, device="cpu")}
        rows.append(row)
        print(f"{pattern:52s} {label:18s} ppl {row['perplexity']:8.3f}  params {fraction:.3f}  {seconds:.0f} s  ({row['perplexity'] / reference:.2f}x structured:0.3)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 × 256 calibration, 16 × 512 evaluation")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    protocol = dict(nsamples=16, seqlen=256, eval_windows=16) if args.quick else dict(nsamples=64, seqlen=512, eval_windows=64)
    started = time.perf_counter()
    config = loading.load(loading.SMOLLM2_ALIAS)[0].config
    rows, dense = [], None
    for i, (pattern, spec) in enumerate(VARIANTS):
        method, _, options = spec.partition(":")
        runs = ([Run("dense")] if i == 0 else []) + [Run(method, dict(kv.split("=") for kv in options.split(",")) if options else {})]
        runs = [Run(r.method, {k: float(v) for k, v in r.options.items()}) for r in runs]
        for row in compare(loading.SMOLLM2_ALIAS, runs, pattern, calibration=Calibration(nsamples=protocol["nsamples"], seqlen=protocol["seqlen"]),
                           evaluation=Evaluation(windows=protocol["eval_windows"], seqlen=512), execution=Execution(device="cpu")):
            if row["method"] == "dense":
                dense = row["perplexity"]
                continue
            row["decoder_parameters"], row["deployed_parameters"] = decoder_parameters(config, pattern)
            rows.append(row)
            print(f"{pattern:52s} {row['label']:18s} ppl {row['perplexity']:8.3f}  params {row['deployed_parameters']:.3f}  {row['seconds']:.0f} s", flush=True)
    reference = rows[0]["perplexity"]
    rows += beyond_width(protocol, reference)
    header = ["pattern", "method", "decoder params × dense (nominal)", "deployed", "perplexity", "× structured:0.3", "pruning s"]
    cells = [[r["pattern"], r["label"], f"{r['decoder_parameters']:.3f}", f"{r['deployed_parameters']:.3f}", f"{r['perplexity']:.2f}",
              f"{r['perplexity'] / reference:.2f}", f"{r['seconds']:.0f}"] for r in rows]
    intro = (f"SmolLM2-135M (dense perplexity {dense:.2f}), calibration {protocol['nsamples']}×{protocol['seqlen']} Austen (seed 0), "
             f"evaluation {protocol['eval_windows']}×512 Emma + Persuasion, CPU, {torch.get_num_threads()} threads, "
             f"{time.perf_counter() - started:.0f} s; `python bench/studies/width_quality.py{' --quick' if args.quick else ''}`")
    stem = "width-quality-quick" if args.quick else "width-quality"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"dense": dense, "protocol": protocol, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text("\n".join([intro, "", *markdown_table(header, cells)]) + "\n")
    print()
    print(intro)
    print("\n".join(markdown_table(header, cells)))


if __name__ == "__main__":
    main()
