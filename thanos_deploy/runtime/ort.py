"""ONNX Runtime on an exported folder (model.onnx with the Optimum-style names)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..loading import onnx_file
from .base import Backend

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def create_session(path: Path, provider: str = "cpu", provider_options: dict | None = None):
    """An InferenceSession on exactly the requested provider, or a clear error.

    ONNX Runtime silently falls back to CPU when a GPU provider cannot start; we check
    get_providers() and refuse that fallback.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install 'thanos-deploy[cpu]' (or [gpu] for CUDA/TensorRT)") from None
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider '{provider}': choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    providers = [(wanted, provider_options or {})] if provider != "cpu" else []
    providers.append("CPUExecutionProvider")
    with warnings.catch_warnings():  # ORT warns and falls back when a provider is missing; we check below
        warnings.simplefilter("ignore")
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # ORT's pybind errors (InvalidProtobuf, Fail, ...) share no base class but Exception
            if not Path(path).is_file():
                raise
            raise UserError(f"ONNX Runtime cannot load '{path}' ({str(e).splitlines()[0][:200]}): re-export it (thanos-deploy export onnx)") from None
    active = session.get_providers()
    if active[0] != wanted:
        raise UserError(
            f"ONNX Runtime did not start {wanted} (active: {', '.join(active)}): install onnxruntime-gpu "
            "(not next to onnxruntime) with matching CUDA/TensorRT libraries, or use --provider cpu"
        )
    return session


class OrtBackend(Backend):
    def __init__(self, target: str, *, provider: str = "cpu", provider_options: dict | None = None):
        self.path = onnx_file(target)
        self.session = create_session(self.path, provider, provider_options)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.dtype = np.float16 if any("float16" in i.type for i in inputs.values() if i.name in self.past_names) else np.float32
        if self.past_names:
            shape = inputs[self.past_names[0]].shape
            self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def step(self, input_ids, attention_mask, position_ids, state):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(), "position_ids": position_ids.numpy()}
        if self.past_names:
            if state is None:
                empty = np.zeros((input_ids.shape[0], self.kv_heads, 0, self.head_dim), dtype=self.dtype)
                state = [empty] * len(self.past_names)
            feeds.update(zip(self.past_names, state))
        outputs = self.session.run(None, feeds)
        logits = torch.from_numpy(np.asarray(outputs[0], dtype=np.float32))
        return logits, (outputs[1:] if self.past_names else None)
