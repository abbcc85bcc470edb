"""Backends that run a compressed model: one small interface, four implementations.

    backend = open_backend("torch" | "ort" | "tensorrt" | "llamacpp", target, device=..., ...)
    logits, state = backend.prefill(input_ids)         # [batch, seq] token ids
    logits, state = backend.decode(next_ids, state)    # [batch, 1]
    ids = backend.generate(input_ids, max_new_tokens)  # greedy

`torch` runs a checkpoint (2:4 semi-structured kernels on CUDA when packed), `ort` an exported
ONNX folder with ONNX Runtime, `tensorrt` a serialized engine (.plan), `llamacpp` a .gguf file
with llama.cpp. Imports are lazy: ONNX Runtime, TensorRT and llama-cpp-python are needed only by
their own backend.
"""

import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..errors import UserError, at_least
from ..loading import pick_device
from .base import Backend
from .llamacpp import LlamaCppBackend
from .ort import OrtBackend
from .tensorrt import TensorRTBackend
from .torch_backend import TorchBackend

BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend, "ort": OrtBackend, "tensorrt": TensorRTBackend, "llamacpp": LlamaCppBackend}


def open_backend(kind: str, target: str, **options) -> Backend:
    """The backend `kind` opened on `target` (a checkpoint, an ONNX folder or a .plan)."""
    if kind not in BACKENDS:
        raise UserError(f"unknown backend '{kind}': choose one of {', '.join(BACKENDS)}")
    return BACKENDS[kind](target, **options)



def native_backend(target: str) -> str:
    """The backend that runs `target` as it is: .gguf → llamacpp, .plan → tensorrt, ONNX → ort, else torch."""
    path = Path(target)
    if path.suffix in (".gguf", ".plan"):
        return {".gguf": "llamacpp", ".plan": "tensorrt"}[path.suffix]
    return "ort" if path.suffix == ".onnx" or (path / "model.onnx").is_file() else "torch"


def generate(kind: str | None, target: str, prompt: str, max_new_tokens: int = 32, *, device: str = "auto", provider: str = "cpu",
             tokenizer_path: str | None = None) -> dict:
    """Greedy generation from `prompt` on any backend: the continuation, its token count and seconds.
    The tokenizer is the backend's (torch, llamacpp), or the one next to the model, or `tokenizer_path`."""
    at_least(1, max_new_tokens=max_new_tokens)
    kind = kind or native_backend(target)
    options = {"device": pick_device(device).type} if kind == "torch" else {"provider": provider} if kind == "ort" else {}
    runner = open_backend(kind, target, **options)
    tokenizer = getattr(runner, "tokenizer", None)
    if tokenizer is None:
        where = tokenizer_path or (Path(target).parent if Path(target).is_file() else target)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError):
            raise UserError(f"no tokenizer found in '{where}': pass --tokenizer FOLDER") from None
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    if ids.numel() == 0:
        raise UserError("--prompt is empty: give some text to continue")
    started = time.perf_counter()
    out = runner.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return {"backend": kind, "prompt": prompt, "text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
            "tokens": int(out.shape[1] - ids.shape[1]), "seconds": time.perf_counter() - started}


__all__ = ["BACKENDS", "Backend", "generate", "native_backend", "open_backend"]
