"""What `eval` measures: perplexity over non-overlapping windows of the evaluation split, with the
whole model in memory or, for a model that does not fit (--offload), streamed one decoder layer at
a time (pipeline/streamed.py); or task accuracy through lm-evaluation-harness (tasks/)."""

from __future__ import annotations

from pathlib import Path

from . import data, loading, models, tasks
from .errors import UserError, at_least
from .evaluate import evaluate
from .pipeline import streamed
from .pipeline.offload import load_skeleton, wants_offload
from .request import Tasks


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


def evaluate_tasks(model: str, chosen: Tasks, *, device="auto", dtype: str = "auto") -> dict:
    """`eval --tasks`: load any model or artifact (dense, masked, packed, shrunk, plain, a GGUF) and
    run lm-evaluation-harness's tasks on it; {"model", "tasks": {task: {metric: value, metric_stderr: value}}}."""
    path = Path(model)
    if path.suffix in (".onnx", ".plan") or (path.is_dir() and (path / "model.onnx").is_file()):
        raise UserError(f"'{model}' is an exported model: task accuracy runs on the torch backend; pass the artifact it was exported from")
    tasks.check(list(chosen.names))
    dev = loading.pick_device(device)
    net, tokenizer = loading.load(model, dtype=dtype, device=dev)
    return {"model": model, "tasks": tasks.run(net, tokenizer, list(chosen.names), num_fewshot=chosen.num_fewshot, limit=chosen.limit)}

