"""What `eval` measures: perplexity over non-overlapping windows of the evaluation split, with the
whole model in memory or, for a model that does not fit (--offload), streamed one decoder layer at
a time (pipeline/streamed.py)."""

from __future__ import annotations

from . import data, loading, models
from .errors import UserError, at_least
from .evaluate import evaluate
from .pipeline import streamed
from .pipeline.offload import load_skeleton, wants_offload


def evaluate_model(model: str, source: str = "austen", seqlen: int = 512, max_windows: int = 0, *, device="auto", dtype: str = "auto",
                   offload: bool | None = None) -> dict:
    """`eval`: load any model or artifact and measure its perplexity (max_windows 0: every window).
    `offload` None: stream the layers when the model would not fit in memory."""
    if max_windows < 0:
        raise UserError(f"--max-windows must be 0 (all) or positive, got {max_windows}")
    at_least(1, seqlen=seqlen)
    dev = loading.pick_device(device)
    if wants_offload(model, offload, compatible=True):
        skeleton = load_skeleton(model, dtype=dtype)
        windows = data.windows(data.evaluation_tokens(source, skeleton[1]), models.context_length(skeleton[0], seqlen), max_windows)
        return {"model": model, "data": source, "offload": True, **streamed.perplexity(skeleton, windows, device=dev)}
    net, tokenizer = loading.load(model, dtype=dtype)
    return {"model": model, **evaluate(net, tokenizer, source, seqlen, max_windows, dev)}
