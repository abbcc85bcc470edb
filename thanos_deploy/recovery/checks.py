"""What `recover` checks and loads before it trains: the student artifact, its teacher, that the
two speak the same vocabulary, the data and the evaluation windows. Everything here happens
before the staging folder is opened, so bad input leaves nothing behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data, loading, models
from ..artifact import MANIFEST, Manifest
from ..errors import UserError
from ..progress import Reporter
from ..request import RecoverRequest


@dataclass
class Setup:
    """The loaded student and teacher, the training text and the evaluation windows."""

    student: nn.Module
    tokenizer: object
    manifest: Manifest
    teacher: nn.Module
    teacher_name: str
    teacher_device: torch.device
    teacher_dtype: str
    documents: list[str]
    eval_windows: torch.Tensor
    chunked: bool  # the loss may be multiplied out a chunk of positions at a time (head_is_last_layer)


def load(request: RecoverRequest, device: torch.device, reporter: Reporter) -> Setup:
    """Student, teacher (on its device, frozen), data and evaluation windows, each checked."""
    with reporter.status(f"loading {request.student}"):
        student, tokenizer, manifest = load_student(request.student)
    teacher = request.teacher.model or manifest.source_model
    if not teacher:
        raise UserError(f"'{request.student}' does not name the model it was pruned from: pass --teacher DENSE")
    if manifest.source_model and not same_model(teacher, manifest.source_model):
        reporter.warn(f"teacher '{teacher}' is not the model '{request.student}' was pruned from ('{manifest.source_model}')")
    seqlen = request.training.seqlen
    if (context := models.context_length(student, seqlen)) < seqlen:
        raise UserError(f"--seqlen {seqlen} is longer than the model's context ({context} tokens): use a smaller --seqlen")
    evaluation = request.evaluation
    with reporter.status(f"reading data '{request.training.data}'"):
        documents = data.documents(request.training.data, "calibration")
        windows = data.windows(data.evaluation_tokens(evaluation.data, tokenizer), models.context_length(student, evaluation.seqlen),
                               evaluation.windows)
    t_device = loading.pick_device(request.teacher.device) if request.teacher.device else device
    t_dtype = request.teacher.dtype if request.teacher.dtype != "auto" else ("bfloat16" if t_device.type == "cuda" else "float32")
    with reporter.status(f"loading teacher {teacher}"):
        teacher_net, teacher_tokenizer = loading.load(teacher, dtype=t_dtype)
    check_pair(student, tokenizer, teacher_net, teacher_tokenizer, teacher)
    chunked = head_is_last_layer(student) and head_is_last_layer(teacher_net)
    teacher_net.to(t_device).eval().requires_grad_(False)
    return Setup(student, tokenizer, manifest, teacher_net, teacher, t_device, t_dtype, documents, windows, chunked)


def load_student(student: str) -> tuple[nn.Module, object, Manifest]:
    """An artifact `compress` wrote, in float32 to train."""
    folder = Path(student).expanduser()
    if not folder.exists():
        raise UserError(f"'{student}' does not exist: pass the folder `thanos-deploy compress` wrote")
    manifest = Manifest.read(folder) if folder.is_dir() else None
    if manifest is None:
        raise UserError(f"'{student}' is not a thanos-deploy artifact (no {MANIFEST}): recover trains what "
                        "`thanos-deploy compress` wrote; compress the model first")
    if not manifest.pattern or not manifest.sparsity:
        raise UserError(f"'{student}' is dense (nothing was pruned): recover restores pruned models; compress it first")
    model, tokenizer = loading.load(str(folder), dtype="float32")
    return model, tokenizer, manifest


def same_model(a: str, b: str) -> bool:
    try:
        return Path(loading.resolve(a)).resolve() == Path(loading.resolve(b)).resolve()
    except (UserError, TypeError):
        return a == b


def check_pair(student: nn.Module, student_tokenizer, teacher: nn.Module, teacher_tokenizer, teacher_name: str) -> None:
    """The teacher must speak the student's vocabulary, token for token."""
    s_vocab, t_vocab = student.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features
    if s_vocab != t_vocab:
        raise UserError(f"teacher '{teacher_name}' has a vocabulary of {t_vocab} tokens, the student {s_vocab}: distil from the dense model the student was pruned from")
    if student_tokenizer is not None and teacher_tokenizer is not None and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError(f"teacher '{teacher_name}' has a different tokenizer from the student's: distil from the dense model the student was pruned from")


def head_is_last_layer(model: nn.Module) -> bool:
    """Whether the model's logits are its output embedding applied to the last hidden state, so the
    loss may multiply them out a chunk at a time (not so where a family soft-caps or scales them)."""
    ids = torch.arange(8, device=next(model.parameters()).device).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return torch.allclose(model.get_output_embeddings()(hidden).to(logits.dtype), logits, rtol=1e-4, atol=1e-5)
