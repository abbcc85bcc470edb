"""The end of `recover`: the trained weights gathered on process 0 and written in the student's own
storage and dtype, with its manifest (artifact.Manifest.recovered), the log and the curve."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import torch

from .. import loading
from ..artifact import Manifest, save
from ..plots import recovery_curves
from ..request import RecoverRequest
from .checks import Setup, load_student
from .trainer import frozen_zeros


def write(trained: dict, setup: Setup, request: RecoverRequest, result: dict) -> Manifest:
    """The student as it was written, its weights replaced by the `trained` ones (every pruned weight
    checked to be exactly zero still), cast back, saved with recovery.json and recovery.png."""
    net, tokenizer, manifest = load_student(request.student)
    before = dict(net.named_parameters())
    zeros = {name: before[name] == 0 for name in frozen_zeros(net)}
    net.load_state_dict(trained, strict=True)
    after = dict(net.named_parameters())
    for name, zero in zeros.items():  # what pruning removed is still exactly zero
        if bool((after[name][zero] != 0).any()):
            raise RuntimeError(f"{name}: a pruned weight moved during recovery")
    dtype = loading.DTYPES.get(manifest.dtype or "float32")
    if dtype is not None:
        net.to(dtype)
    log = result["log"]
    recovery = {"teacher": setup.teacher_name, **settings(request), "steps": result["steps"], "tokens_trained": result["tokens"],
                "seconds": result["seconds"], "world": result["world"], "perplexity_start": log[0]["perplexity"] if log else None,
                "perplexity_end": log[-1]["perplexity"] if log else None, "final_kl": log[-1].get("kl") if log else None}
    curve = io.BytesIO()
    recovery_curves({f"{manifest.pattern} {manifest.method}": log}, curve, title=f"recover from {setup.teacher_name}")
    extras = {"recovery.json": (json.dumps({**result, "settings": settings(request), "teacher": setup.teacher_name}, indent=2) + "\n").encode(),
              "recovery.png": curve.getvalue()}
    made = manifest.recovered(recovery, evaluated_on=request.evaluation.data)
    with torch.no_grad():
        return save(net, tokenizer, request.output.out, made, overwrite=request.output.overwrite, extras=extras)


def settings(request: RecoverRequest) -> dict:
    """What decided the recovered weights, as the manifest and the log record them."""
    training, evaluation = request.training, request.evaluation
    return {**asdict(training), "max_seconds": training.max_seconds, "eval_windows": evaluation.windows, "eval_seqlen": evaluation.seqlen,
            "eval_data": evaluation.data}
