"""Backends that run a compressed model: one small interface, three implementations.

    backend = open_backend("torch" | "ort" | "tensorrt", target, device=..., ...)
    logits, state = backend.prefill(input_ids)         # [batch, seq] token ids
    logits, state = backend.decode(next_ids, state)    # [batch, 1]
    ids = backend.generate(input_ids, max_new_tokens)  # greedy

`torch` runs a checkpoint (2:4 semi-structured kernels on CUDA when packed), `ort` an exported
ONNX folder with ONNX Runtime, `tensorrt` a serialized engine (.plan). Imports are lazy: the
ONNX Runtime and TensorRT packages are needed only by their own backend.
"""

from .base import Backend, open_backend

__all__ = ["Backend", "open_backend"]
