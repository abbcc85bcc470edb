"""The end of `recover`: the recovered model in the student's own storage and dtype, its manifest
(artifact.Manifest.recovered), the log and the curve."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

from .. import loading
from ..artifact import Manifest, save
from ..plots import recovery_curves
from ..request import RecoverRequest
from .trainer import Trainer


def write(trainer: Trainer, request: RecoverRequest, result: dict) -> Manifest:
    """Check that every pruned weight is still exactly zero, cast back, and save with recovery.json
    and recovery.png next to the weights."""
    net, setup = trainer.net, trainer.setup
    net.eval().requires_grad_(False)
    params = dict(net.named_parameters())
    for name, mask in trainer.masks.items():
        if bool((params[name][~mask] != 0).any()):
            raise RuntimeError(f"{name}: a pruned weight moved during recovery")
    net.to("cpu")
    dtype = loading.DTYPES.get(setup.manifest.dtype or "float32")
    if dtype is not None:
        net.to(dtype)
    log = result["log"]
    recovery = {"teacher": setup.teacher_name, **_settings(request), "steps": result["steps"], "tokens_trained": result["tokens"],
                "seconds": result["seconds"], "world": result["world"], "perplexity_start": log[0]["perplexity"] if log else None,
                "perplexity_end": log[-1]["perplexity"] if log else None, "final_kl": log[-1].get("kl") if log else None}
    curve = io.BytesIO()
    recovery_curves({f"{setup.manifest.pattern} {setup.manifest.method}": log}, curve, title=f"recover from {setup.teacher_name}")
    extras = {"recovery.json": (json.dumps({**result, "settings": _settings(request), "teacher": setup.teacher_name}, indent=2) + "\n").encode(),
              "recovery.png": curve.getvalue()}
    made = setup.manifest.recovered(recovery, evaluated_on=request.evaluation.data)
    return save(net, setup.tokenizer, request.output.out, made, overwrite=request.output.overwrite, extras=extras)


def _settings(request: RecoverRequest) -> dict:
    """What decided the recovered weights, as the manifest and the log record them."""
    training, evaluation = request.training, request.evaluation
    return {**asdict(training), "max_seconds": training.max_seconds, "eval_windows": evaluation.windows, "eval_seqlen": evaluation.seqlen,
            "eval_data": evaluation.data}
