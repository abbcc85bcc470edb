"""`export gguf`: an artifact whose architecture is a plain one (dense, masked, width-pruned plain,
recovered) to a GGUF file for llama.cpp, Ollama and LM Studio, with llama.cpp's own converter and
quantiser (llamacpp_build.py): f32, f16, bf16 and q8_0 straight from the converter, the other types
(q4_k_m, q5_k_m, q6_k, q4_0, …) through llama-quantize from an f32 conversion. Every tensor the
tools kept at another type is reported. Then the file is checked against the artifact: its
weights, read back by transformers' GGUF loader, give logits on a few windows of the evaluation
text equal to the artifact's to rounding (f32, f16, bf16), or a perplexity change it reports
(quantised types).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tempfile
import time
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .. import data, loading
from .. import llamacpp_build as llamacpp
from ..artifact import Manifest, check_output
from ..errors import UserError
from ..evaluate import windows_perplexity

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
TYPES = CONVERTER_TYPES + QUANTIZER_TYPES
CONVERTER_FALLBACK = re.compile(r"Can't quantize tensor with shape \(([\d, ]+)\) to (\w+), falling back to (\w+)")
CONVERTED = re.compile(r"INFO:hf-to-gguf:(\S+),\s+torch\.\w+ --> (\w+), shape = \{([\d, ]+)\}")
QUANTIZER_FALLBACK = re.compile(r"^warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\w+)\).*falling back to\s+(\w+)")
CHECK_WINDOWS, CHECK_SEQLEN = 4, 128
Q8_0_BLOCK = 32  # values per q8_0 block: a row must be a whole number of them


def export_gguf(model: str, out: Path, *, kind: str = "f16", overwrite: bool = False) -> dict:
    """Write `model` (any plain-architecture artifact) to `out` as a GGUF of type `kind`; returns the
    report: sizes, the tensors kept at another type, the check against the artifact, seconds."""
    kind = kind.lower()
    if kind not in TYPES:
        raise UserError(f"unknown --type '{kind}': choose {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir() or out.suffix != ".gguf":
        raise UserError(f"--out '{out}' is not a .gguf file path: give e.g. --out model.gguf")
    check_output(out, overwrite)
    folder = _plain_folder(model)
    llamacpp.sources()
    if kind in QUANTIZER_TYPES:
        llamacpp.tool("llama-quantize")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent if out.parent.exists() else None) as tmp:
        first = Path(tmp) / f"converted-{kind if kind in CONVERTER_TYPES else 'f32'}.gguf"
        lines = llamacpp.convert(_named_architecture(folder, Path(tmp)), first, kind if kind in CONVERTER_TYPES else "f32")
        kept = _converter_kept(lines, kind)
        made = first
        if kind in QUANTIZER_TYPES:
            made = Path(tmp) / f"{kind}.gguf"
            kept += _quantizer_kept(llamacpp.quantize(first, made, kind))
        seconds = time.perf_counter() - started
        check = verify(folder, made, kind)
        out.parent.mkdir(parents=True, exist_ok=True)
        made.replace(out)
    return {"model": model, "out": str(out), "type": kind, "bytes": out.stat().st_size, "kept": kept, "check": check,
            "seconds": round(seconds, 1), "llama_cpp": f"{llamacpp.PACKAGE} {llamacpp.VERSION} sources"}


def file_type(path: Path) -> str | None:
    """The type a GGUF file was written as (`general.file_type`: f16, q8_0, q4_k_m, …), None when unknown."""
    try:
        name = gguf.LlamaFileType(gguf.GGUFReader(path).fields["general.file_type"].contents()).name.lower()
    except (KeyError, ValueError, OSError):
        return None
    name = name.removeprefix("mostly_").removeprefix("all_")
    return name if name in TYPES else None


def _plain_folder(model: str) -> Path:
    """The folder of an artifact llama.cpp's converter reads: a standard architecture on disk."""
    path = Path(model)
    if path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file()):
        raise UserError(f"'{model}' is an ONNX export: export the artifact it came from (a checkpoint folder) to GGUF")
    where = loading.resolve(model)
    if isinstance(where, str):
        raise UserError(f"'{model}' is a hub id: export gguf reads a local folder; download it first")
    manifest = Manifest.read(where)
    if manifest is not None and manifest.storage in ("shrunk", "packed") and not manifest.plain:
        raise UserError(f"'{model}' is stored {manifest.storage}, which llama.cpp cannot read: export the masked artifact (compress without "
                        "--shrink/--pack), or prune with a width pattern for a plain smaller architecture")
    loading.load_config(model)  # a decoder-only causal LM
    return Path(where)


def _named_architecture(folder: Path, tmp: Path) -> Path:
    """The folder, or a view of it (links to its files) whose config.json names the model class:
    llama.cpp's converter picks its architecture from `architectures`, which folders converted
    from GGUF by earlier versions of this tool lack."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures"):
        return folder
    view = tmp / "view"
    view.mkdir()
    for item in folder.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item.resolve())
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view


def _converter_kept(lines: list[str], kind: str) -> list[dict]:
    """Tensors the converter stored at another type than asked for (it skips what it cannot quantise)."""
    if kind not in ("q8_0", "bf16", "f16"):
        return []
    wanted = {"q8_0": "Q8_0", "bf16": "BF16", "f16": "F16"}[kind]
    kept = []
    for line in lines:
        match = CONVERTED.search(line)
        if match and match[2] != wanted and not match[1].endswith(("norm.weight", ".bias")) and match[3].count(",") >= 1:
            shape = [int(v) for v in match[3].split(",")]  # GGUF order: the row length first
            kept.append({"tensor": match[1], "type": match[2], "wanted": wanted, "row": shape[0], "by": "converter",
                         **({"needs_multiple_of": Q8_0_BLOCK} if kind == "q8_0" and shape[0] % Q8_0_BLOCK else {})})
    return kept


def _quantizer_kept(lines: list[str]) -> list[dict]:
    """Tensors llama-quantize kept at another type, with its reason (a row length the type cannot divide)."""
    return [{"tensor": m[1], "type": m[5], "wanted": m[4], "row": int(m[2]), "needs_multiple_of": int(m[3]), "by": "llama-quantize"}
            for m in (QUANTIZER_FALLBACK.search(line) for line in lines) if m]


def verify(folder: Path, gguf: Path, kind: str) -> dict:
    """The GGUF read back by transformers' GGUF loader against the artifact, on a few windows of the
    evaluation text: max |logit difference| and the perplexity of each."""
    source, tokenizer = loading.load(str(folder), dtype="float32")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its own tqdm bar, which transformers' progress switch does not reach
            back = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise UserError(f"transformers cannot read back the GGUF it was given ({str(e).splitlines()[0]})") from None
    windows = data.windows(data.evaluation_tokens("austen", tokenizer), CHECK_SEQLEN, CHECK_WINDOWS)
    with torch.no_grad():
        difference = max(float((source(input_ids=w[None]).logits - back(input_ids=w[None]).logits).abs().max()) for w in windows)
    before = windows_perplexity(lambda batch: source(input_ids=batch).logits, windows)["perplexity"]
    after = windows_perplexity(lambda batch: back(input_ids=batch).logits, windows)["perplexity"]
    return {"windows": CHECK_WINDOWS, "seqlen": CHECK_SEQLEN, "max_abs_logit_difference": difference, "perplexity_artifact": before,
            "perplexity_gguf": after, "perplexity_change": after / before - 1 if math.isfinite(after) else None}
