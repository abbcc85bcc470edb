"""Writing outputs atomically, and saving/loading pruned checkpoints.

A checkpoint is a Hugging Face folder (config.json, safetensors, tokenizer) plus
`thanos_deploy.json`, the manifest: what was done, how well, and how it is stored.

- `masked`: the standard layout; plain `AutoModelForCausalLM.from_pretrained` loads it.
- `shrunk` with `plain` set: MLPs narrowed alike in every layer, a smaller width in config.json;
  plain transformers loads it too (compact/plain.py).
- `shrunk` / `packed`: compact linears (compact/). Their shapes live in the manifest's `modules`
  (stock configs have one width per model); tensors are in `model.safetensors`, never pickles.
  Packed N:M weights are stored as `<name>.values` + `<name>.meta` (compact/pack.py).

The manifest records the sha256 of every safetensors file; `load` refuses a file that does not
match, so a truncated or tampered checkpoint fails loudly instead of running garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from .compact.linear import CompactLinear
from .compact.pack import pack, unpack
from .errors import UserError

MANIFEST = "thanos_deploy.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # Hugging Face's map of tensor names to shard files


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if `out` exists and may not be replaced."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() or out.is_file()):
        raise UserError(f"output '{out}' is a special file (a device, socket or pipe): choose a folder path for --out")
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise UserError(f"output '{out}' is the current folder or one above it, which would be replaced: choose a new folder for --out")
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists: pass --overwrite or choose another --out")
    existing = next(p for p in out.parents if p.exists())  # missing parents are made when saving
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write '{out}': '{existing}' is not a writable folder")
    return out


@contextmanager
def staged(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `out`; on success it replaces `out` in one rename.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replacing(path: str | Path):
    """Yield a temporary file next to `path` (same suffix: writers that go by it still work); on
    success it replaces `path` in one rename, so a reader or a kill never meets half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save(model: nn.Module, tokenizer, out: str | Path, manifest: dict, *, overwrite: bool = False, extras: dict[str, bytes] | None = None) -> Path:
    """Save a pruned model with its manifest, atomically. `manifest['storage']` picks the layout;
    `extras` are further files (a log, a plot) written into the same folder."""
    storage = manifest.get("storage", "masked")
    with staged(out, overwrite) as tmp:
        for name, blob in (extras or {}).items():
            (tmp / name).write_bytes(blob)
        if storage == "masked" or manifest.get("plain"):
            model.save_pretrained(tmp)
        else:
            _save_compact(model, manifest["modules"], tmp)
        legacy_rope_keys(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {p.name: sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")
    return Path(out)


def legacy_rope_keys(folder: Path) -> None:
    """Add `rope_theta` (and `rope_scaling`) next to transformers 5's `rope_parameters` in
    config.json. transformers 4.x, which Optimum and many serving engines pin, reads only the old
    keys and otherwise falls back to its default θ without a word (for SmolLM2 10 000 instead of
    100 000: different logits). transformers 5 reads either."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return  # nothing to translate, or per-layer-type parameters (no single old-style value)
    config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_compact(model: nn.Module, modules: dict, folder: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings, restored on load
    for name, spec in modules.items():
        if spec["kind"] == "packed":
            values, meta = pack(state.pop(f"{name}.weight"), spec["n"], spec["m"])
            state[f"{name}.values"], state[f"{name}.meta"] = values, meta
    model.config.save_pretrained(folder)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def onnx_file(target: str | Path) -> Path:
    """model.onnx of an exported folder (or the file itself)."""
    path = Path(target)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"'{target}' is not an ONNX model or a folder with model.onnx: run 'thanos-deploy export onnx' first")
    return path


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e}): the checkpoint is damaged, re-create it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise UserError(f"'{path}' is not a thanos-deploy manifest (a JSON object with 'files'): the checkpoint is damaged, re-create it")
    storage = manifest.get("storage", "masked")
    if storage not in ("masked", "shrunk", "packed", "plain") or (storage in ("shrunk", "packed") and not isinstance(manifest.get("modules"), dict)):
        raise UserError(f"'{path}' has storage '{storage}' without valid 'modules': the checkpoint is damaged, re-create it")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"checkpoint '{folder}' lacks {name}: it is incomplete, re-create it")
        if sha256(path) != digest:
            raise UserError(f"'{path}' does not match the hash in {MANIFEST}: the file is damaged or was modified; re-create the checkpoint")


def load_pretrained(where, *, dtype="auto"):
    """Load any checkpoint: masked (plain transformers) or compact (shapes from the manifest)."""
    folder = Path(where) if Path(str(where)).is_dir() else None
    manifest = read_manifest(folder) if folder else None
    if manifest is not None:
        verify_files(folder, manifest)
    try:
        if manifest is None or manifest.get("storage", "masked") == "masked" or manifest.get("plain"):
            return AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        return _load_compact(folder, manifest, dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{where}': {msg}") from None


def _load_compact(folder: Path, manifest: dict, dtype) -> nn.Module:
    config = AutoConfig.from_pretrained(folder)
    try:
        state = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise UserError(f"'{folder / WEIGHTS}' cannot be read ({e}): the file is damaged, re-create the checkpoint") from None
    stored = next(v.dtype for v in state.values() if v.is_floating_point())
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=stored)
    for name, spec in manifest["modules"].items():
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
