"""TensorRT: run a serialized engine (.plan) with torch CUDA tensors.

Written against TensorRT's name-based I/O API (10.x/11.x: set_input_shape, set_tensor_address,
execute_async_v3). Needs an NVIDIA GPU and TensorRT; not run by this project's CI.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .base import Backend


def require_tensorrt():
    """The tensorrt module, or one clear error saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        raise UserError(
            f"TensorRT is not available here ({type(e).__name__}): it needs an NVIDIA GPU and TensorRT's libraries; "
            "on such a machine: pip install 'thanos-deploy[tensorrt]'"
        ) from None
    return tensorrt


class TensorRTBackend(Backend):
    def __init__(self, target: str):
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise UserError("the TensorRT backend needs an NVIDIA GPU with CUDA: none is visible here")
        plan = Path(target)
        if not plan.is_file():
            raise UserError(f"engine '{target}' does not exist: build one with 'thanos-deploy build-engine'")
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not load '{target}': was it built with this TensorRT version and GPU?")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        if self.past_names:
            shape = self.engine.get_tensor_shape(self.past_names[0])
            self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def _torch_dtype(self, dtype):
        trt = self.trt
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                 trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "BF16"):
            table[trt.DataType.BF16] = torch.bfloat16
        return table[dtype]

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, state):
        device = torch.device("cuda")
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.past_names:
            if state is None:
                empty = torch.zeros(input_ids.shape[0], self.kv_heads, 0, self.head_dim, dtype=self.dtypes[self.past_names[0]], device=device)
                state = [empty] * len(self.past_names)
            feeds.update(zip(self.past_names, state))
        keep = []  # tensors must outlive the launch
        for name in self.inputs:
            t = feeds[name].to(device=device, dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else _scratch(device).data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.dtypes[name], device=device)
            results[name] = t
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else _scratch(device).data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UserError("TensorRT failed to run the engine (see its log above)")
        stream.synchronize()
        logits = results["logits"].float().cpu()
        present = [results[n.replace("past_key_values.", "present.")] for n in self.past_names] if self.past_names else None
        return logits, present


_SCRATCH: dict = {}


def _scratch(device) -> torch.Tensor:
    """A valid address for zero-size tensors (an empty past)."""
    if device not in _SCRATCH:
        _SCRATCH[device] = torch.empty(256, dtype=torch.uint8, device=device)
    return _SCRATCH[device]
