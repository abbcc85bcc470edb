"""Prune models larger than memory: decoder layers stay on the `meta` device (no storage) until the
driver reaches them, are read from the safetensors shards (memory-mapped) one at a time, pruned,
written out and dropped again. Embeddings, norms and the head are loaded once, at the start.

Peak memory is then one decoder layer + the calibration activations + the statistics, not the model.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from .. import loading, models
from ..artifact import INDEX, Manifest
from ..errors import UserError


class ShardedWeights:
    """Tensor name -> shard file of a safetensors checkpoint; reads a module's tensors only. `renames`
    ((pattern, replacement) pairs, in order) turn the names on disk into the model's, as
    transformers renames some families' keys when it loads them (GPT-NeoX's embed_out → lm_head)."""

    def __init__(self, folder: Path, renames: list[tuple[str, str]] = ()):
        self.folder = folder
        index = folder / INDEX
        try:
            if index.is_file():
                self.where = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
            else:
                self.where = {}
                for path in sorted(folder.glob("*.safetensors")):
                    with safe_open(path, "pt") as f:
                        self.where.update({name: path for name in f.keys()})
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read the safetensors of '{folder}' ({_first_line(e)}): the checkpoint is damaged, re-create it") from None
        if not self.where:
            raise UserError(f"'{folder}' has no safetensors weights: --offload reads safetensors checkpoints only")
        self.stored = {name: name for name in self.where}  # the model's name -> the name on disk
        for disk in list(self.where):
            name = disk
            for pattern, replacement in renames:
                name = re.sub(pattern, replacement, name)
            if name != disk:
                self.where[name], self.stored[name] = self.where.pop(disk), self.stored.pop(disk)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.where.values()))

    def has(self, name: str) -> bool:
        return name in self.where

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype) -> None:
        """Give `module` (on meta) real CPU tensors from the checkpoint: its persistent state by name,
        then its non-persistent buffers (e.g. rotary frequencies) from the model's own initialiser."""
        state = {}
        by_file: dict[Path, list[str]] = {}
        for name in module.state_dict():
            if not self.has(prefix + name):
                raise UserError(f"'{self.folder}' lacks the tensor {prefix + name}: the checkpoint is incomplete, re-create it")
            by_file.setdefault(self.where[prefix + name], []).append(name)
        try:
            for path, names in by_file.items():
                with safe_open(path, "pt") as f:
                    for name in names:
                        tensor = f.get_tensor(self.stored[prefix + name])
                        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read '{path}' ({_first_line(e)}): the file is damaged, re-create the checkpoint") from None
        module.load_state_dict(state, strict=True, assign=True)  # the meta tensors are replaced, nothing else allocated

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor by the model's name (floating ones in `dtype`)."""
        try:
            with safe_open(self.where[name], "pt") as f:
                tensor = f.get_tensor(self.stored[name])
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read '{self.where[name]}' ({_first_line(e)}): the file is damaged, re-create the checkpoint") from None
        return tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_skeleton(spec: str, dtype: str = "auto", *, head: bool = True):
    """(model with its decoder layers on meta, tokenizer, weights): nothing of a decoder layer is read.
    `head` False: an untied output head stays on meta too (pruning never runs it; writing reads it
    from `weights`), which for a large vocabulary is as much memory as the embeddings."""
    if dtype != "auto" and dtype not in loading.DTYPES:
        raise UserError(f"unknown dtype '{dtype}': choose auto, {', '.join(loading.DTYPES)}")
    where = loading.resolve(spec)
    if isinstance(where, str):
        raise UserError(f"--offload reads a local folder, not the hub id '{spec}': download it first (huggingface-cli download)")
    if (Manifest.read(where) or Manifest()).storage != "masked":
        raise UserError(f"'{spec}' is a compact checkpoint: --offload reads dense or masked checkpoints")
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the config of '{spec}' ({_first_line(e)}): pass a Hugging Face model folder") from None
    torch_dtype = loading.DTYPES.get(dtype) or _config_dtype(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    layers = models.decoder_layers(model)  # an unsupported architecture fails here, before any read
    renames = [(source, target) for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)
               for source, target in zip(t.source_patterns, t.target_patterns * len(t.source_patterns))]
    weights = ShardedWeights(where, renames)
    inside = {id(m) for m in layers.modules()}
    output, tied = model.get_output_embeddings(), getattr(config, "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if id(module) in inside or (module is output and ((tied and not weights.has(f"{name}.weight")) or (not tied and not head))):
            continue  # decoder layers: read when reached; a tied head shares the embeddings (tied below); an unwanted one waits
        _load_own(weights, module, name, torch_dtype)
        _init_non_persistent(model, module)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer, weights


def _load_own(weights: ShardedWeights, module: nn.Module, name: str, dtype) -> None:
    """The module's own (non-recursive) tensors; its children are visited separately."""
    prefix = f"{name}." if name else ""
    state = {}
    for key, value in list(module._parameters.items()) + [(k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set]:
        if value is None:
            continue
        if not weights.has(prefix + key):
            raise UserError(f"'{weights.folder}' lacks the tensor {prefix + key}: the checkpoint is incomplete, re-create it")
        with safe_open(weights.where[prefix + key], "pt") as f:
            state[key] = f.get_tensor(weights.stored[prefix + key]).to(dtype if value.is_floating_point() else value.dtype)
    for key, tensor in state.items():
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[key] = tensor


def _init_non_persistent(model: nn.Module, module: nn.Module) -> None:
    """Non-persistent buffers are not in the checkpoint: the model's initialiser computes them. The
    tensors already read are put aside while it runs (some families' initialisers reset a module's
    weights along with its buffers) and put back after."""
    if not any(b is not None and b.is_meta for b in module._buffers.values()):
        return
    for key in module._non_persistent_buffers_set:
        module._buffers[key] = torch.empty_like(module._buffers[key], device="cpu")
    read = [(m, store, key, t) for m in module.modules() for store in (m._parameters, m._buffers) for key, t in store.items()
            if t is not None and not t.is_meta and not (m is module and key in module._non_persistent_buffers_set)]
    for _, store, key, t in read:
        store[key] = t.to("meta") if not isinstance(t, nn.Parameter) else nn.Parameter(t.to("meta"), requires_grad=t.requires_grad)
    try:
        model._init_weights(module)
    finally:
        for _, store, key, t in read:
            store[key] = t


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = loading.DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else torch.float32


def free_layer(layer: nn.Module) -> None:
    """Drop a decoder layer's storage (back to meta, as before `load_into`) and hand the freed
    memory back to the OS: glibc keeps freed mid-sized blocks in its heap otherwise, and the
    resident size would grow layer after layer."""
    layer.to("meta")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def wants_offload(spec: str, flag: bool | None, *, compatible: bool) -> bool:
    """--offload / --no-offload as given; by default, offload a local model whose weights would take
    more than 80 % of the memory available now (and only when the run allows it)."""
    if flag is not None:
        return flag
    where = loading.resolve(spec)
    if isinstance(where, str) or not compatible:
        return False
    return not fits_in_memory(sum(p.stat().st_size for p in Path(where).glob("*.safetensors")))


def fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` take at most 80 % of the memory available now (if unknown: they fit)."""
    available = available_memory()
    return available is None or nbytes <= 0.8 * available


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
