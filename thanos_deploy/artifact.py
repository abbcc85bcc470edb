"""The artifact: a Hugging Face folder (config.json, safetensors, tokenizer) plus `thanos_deploy.json`,
the manifest of what was done, how well, and how it is stored. This module owns both ends: the
manifest is built, checked, read and written here only (`Manifest`), and every output folder is put
in place of `--out` by one writer (`publish`, one rename), so nothing is ever half-written.

Storages:
- `masked`: the original shapes with zeros; plain `AutoModelForCausalLM.from_pretrained` loads it.
- `plain`: width-pruned (or a shrunk model whose MLPs narrowed alike): a standard config with
  smaller widths; plain transformers loads it too.
- `shrunk` / `packed`: compact linears (compact/), their shapes in the manifest's `modules`;
  packed N:M weights as `<name>.values` + `<name>.meta` in model.safetensors.

The manifest records the sha256 of every safetensors file; loading refuses a file that does not
match, so a truncated or tampered artifact fails loudly instead of running garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import struct
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .compact.pack import pack
from .errors import UserError

MANIFEST = "thanos_deploy.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # Hugging Face's map of tensor names to shard files
FORMAT = "thanos-deploy/1"
STORAGES = ("masked", "packed", "shrunk", "plain")


def versions() -> dict:
    """Python and the library versions a result was made with."""
    out = {"python": platform.python_version()}
    for name in ("thanos-deploy", "torch", "transformers", "safetensors", "onnx", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class Manifest:
    """What thanos_deploy.json holds. Built by `compressed` (a pruning run), then changed only
    through `compacted` and `recovered`; `read` checks a file written by any version of this tool."""

    source_model: str | None = None
    storage: str = "masked"
    format: str = FORMAT
    dtype: str | None = None
    method: str | None = None
    pattern: str | None = None
    options: dict | None = None
    sparsity: float | None = None
    targets: list = field(default_factory=list)
    ignore: list = field(default_factory=list)
    world: int = 1
    calibration: dict | None = None
    evaluation: dict | None = None
    versions: dict = field(default_factory=versions)
    seconds: dict | None = None
    layers: list = field(default_factory=list)
    modules: dict | None = None  # shrunk / packed: per compact linear, its kind and shapes
    plain: dict | None = None  # config fields narrowed: {field: [old, new]}
    units: dict | None = None  # width: the units each decoder layer kept
    recovery: dict | None = None  # recover: teacher, budget, perplexity before and after
    files: dict = field(default_factory=dict)  # sha256 of every safetensors file, filled by `write`
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    def __post_init__(self):
        if self.storage not in STORAGES:
            raise ValueError(f"storage '{self.storage}'")
        if self.storage in ("shrunk", "packed") and not isinstance(self.modules, dict):
            raise ValueError(f"storage '{self.storage}' without valid 'modules'")
        if not isinstance(self.files, dict):
            raise ValueError("'files' is not an object")

    @classmethod
    def compressed(cls, report: dict, *, source_model: str, dtype: torch.dtype, calibration: dict, evaluation: dict | None,
                   seconds: float | None) -> "Manifest":
        """A pruning run's masked artifact: `report` is pipeline.sequential's, `calibration` what the windows were."""
        return cls(source_model=source_model, dtype=_dtype_name(dtype), world=report.get("world", 1), calibration=calibration,
                   evaluation=evaluation or None, layers=report["layers"],
                   seconds={**report["seconds"], **({"command": round(seconds, 3)} if seconds is not None else {})},
                   **{k: report[k] for k in ("method", "pattern", "options", "sparsity", "targets", "ignore")})

    @classmethod
    def external(cls, source: str, pattern: str) -> "Manifest":
        """A masked checkpoint pruned elsewhere, described by its pattern alone."""
        return cls(source_model=source, pattern=pattern)

    def compacted(self, storage: str, *, dtype: torch.dtype | None = None, **parts) -> "Manifest":
        """The same artifact in another storage (parts: modules, plain, units) or saved in another dtype."""
        return replace(self, storage=storage, **parts, **({"dtype": _dtype_name(dtype)} if dtype is not None else {}))

    def recovered(self, recovery: dict, evaluated_on: str) -> "Manifest":
        """After `recover`: its record, and the recovered perplexity next to the others."""
        evaluation = {**(self.evaluation or {}), "recovered": {"data": evaluated_on, "perplexity": recovery["perplexity_end"]}}
        return replace(self, recovery=recovery, evaluation=evaluation, versions=versions(), files={})

    # -- on disk --------------------------------------------------------------------------------

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for name in ("modules", "plain", "units", "recovery"):
            if values[name] is None:
                del values[name]
        return {**values, **self.extra}

    def write(self, folder: Path) -> "Manifest":
        """Write thanos_deploy.json into `folder`, with the hash of every safetensors file there."""
        written = replace(self, files={p.name: sha256(p) for p in sorted(Path(folder).glob("*.safetensors"))})
        (Path(folder) / MANIFEST).write_text(json.dumps(written.to_json(), indent=2) + "\n")
        return written

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest | None":
        """The manifest of `folder`, None when it has none; a damaged one is a UserError."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"'{path}' is not valid JSON ({e}): the checkpoint is damaged, re-create it") from None
        if not isinstance(values, dict):
            raise UserError(f"'{path}' is not a thanos-deploy manifest (a JSON object with 'files'): the checkpoint is damaged, re-create it")
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            return cls(**{k: v for k, v in values.items() if k in known}, extra={k: v for k, v in values.items() if k not in known})
        except ValueError as e:
            raise UserError(f"'{path}' has {e}: the checkpoint is damaged, re-create it") from None

    def verify(self, folder: Path) -> None:
        """Every file the manifest lists is there, byte for byte."""
        for name, digest in self.files.items():
            path = folder / name
            if not path.is_file():
                raise UserError(f"checkpoint '{folder}' lacks {name}: it is incomplete, re-create it")
            if sha256(path) != digest:
                raise UserError(f"'{path}' does not match the hash in {MANIFEST}: the file is damaged or was modified; re-create the checkpoint")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- writing


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_HEADER_BYTES_PER_TENSOR = 256  # '"model.layers.29.mlp.down_proj.weight":{"dtype":..,"shape":[..],"data_offsets":[..]},' is about 120


class TensorWriter:
    """Writes `count` tensors to `path` as they come, in the safetensors format: the header's room
    is reserved up front and filled at the end (the format allows padding it with spaces), so no
    tensor waits in memory (the calibration activations between layers, a GGUF being converted).
    The file is written under a temporary name, fsynced and renamed when complete; on an error the
    temporary file is removed."""

    def __init__(self, path: Path, count: int):
        self.path, self.device = path, None  # the device of the tensors (activations are read back there)
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.room = -(-(64 + _HEADER_BYTES_PER_TENSOR * count) // 8) * 8  # the data starts 8-byte aligned
        self.header: dict = {"__metadata__": {"format": "pt"}}
        self.size = 0
        self.file = open(self.tmp, "wb")
        self.file.seek(8 + self.room)

    def append(self, hidden: torch.Tensor, name: str | None = None) -> None:
        """One more tensor, written now: `name` (default: the next batch.N)."""
        self.device = hidden.device
        t = hidden.detach().to("cpu").contiguous()
        data = t.view(-1).view(torch.uint8).numpy()
        self.file.write(data)
        name = name or f"batch.{len(self.header) - 1}"
        self.header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self.size, self.size + data.nbytes]}
        self.size += data.nbytes

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        complete = False
        try:
            if kind is None:
                self._complete()
                complete = True
        finally:
            if not complete:  # an error in the `with` block or while completing: leave nothing behind
                with suppress(OSError):
                    self.file.close()
                self.tmp.unlink(missing_ok=True)

    def _complete(self) -> None:
        header = json.dumps(self.header, separators=(",", ":")).encode()
        assert len(header) <= self.room, "the reserved header room is too small"
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.room) + header.ljust(self.room, b" "))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if `out` exists and may not be replaced, or cannot be written."""
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


def publish(folder: Path, out: Path, *, overwrite: bool) -> Path:
    """Put the finished `folder` in place of `out` in one rename: the one way any output appears.
    An `out` that exists is moved aside first (only with `overwrite`) and removed after."""
    if out.exists():
        if not overwrite:
            raise UserError(f"output '{out}' appeared while working: pass --overwrite or choose another --out")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(folder, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, out)
    return out


@contextmanager
def staged(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `out`, published as `out` when the block ends without an
    error; on an error it is removed and `out` is left as it was."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish(tmp, out, overwrite=overwrite)
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


def save(model: nn.Module, tokenizer, out: str | Path, manifest: Manifest, *, overwrite: bool = False,
         extras: dict[str, bytes] | None = None) -> Manifest:
    """Write a whole artifact at once (the storage picks the layout); `extras` are further files
    (a log, a plot) in the same folder. Returns the manifest as written."""
    with staged(out, overwrite) as tmp:
        for name, blob in (extras or {}).items():
            (tmp / name).write_bytes(blob)
        if manifest.storage in ("masked", "plain") or manifest.plain:
            model.save_pretrained(tmp)
        else:
            _save_compact(model, manifest.modules, tmp)
        finish_folder(tmp, model.config, tokenizer)
        written = manifest.write(tmp)
    return written


def finish_folder(folder: Path, config, tokenizer) -> None:
    """What every artifact holds besides its tensors: the config (with the keys older readers
    need) and the tokenizer."""
    if not (folder / "config.json").is_file():
        config.save_pretrained(folder)
    legacy_rope_keys(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


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
