"""What `bench` can measure: the artifacts this tool writes, how each runs on each backend, and the
facts reported next to its speed (bytes, model-FLOP ratio, pruning time, what actually ran sparse).

checkpoint (masked, shrunk or packed folder)  → torch; ort after an ONNX export; tensorrt after
                                                an fp16 export and an engine build; llamacpp after
                                                a GGUF export in the .gguf candidates' type (f16
                                                when there are none; plain architectures only)
ONNX folder or model.onnx                     → ort; tensorrt after an engine build
TensorRT plan (.plan)                         → tensorrt
GGUF file (.gguf)                             → llamacpp
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .. import loading
from ..artifact import Manifest
from ..compact.linear import CompactLinear
from ..errors import UserError
from ..exporters.gguf import export_gguf, file_type
from ..exporters.onnx import write_artifact
from ..exporters.tensorrt import build_engine, require_tensorrt
from ..runtime import BACKENDS
from ..runtime.llamacpp import binding

NATIVE = {"checkpoint": "torch", "onnx": "ort", "plan": "tensorrt", "gguf": "llamacpp"}
GGUF_TYPE = "f16"  # a checkpoint benched on llama.cpp, when no .gguf says which type: the export that keeps its weights to rounding


@dataclass
class Artifact:
    label: str
    path: Path
    kind: str  # checkpoint | onnx | plan | gguf
    manifest: Manifest | None = field(default=None, repr=False)

    @property
    def config_folder(self) -> Path | None:
        """The folder with config.json: the checkpoint or ONNX folder, or the plan's ONNX folder."""
        if self.kind == "gguf":
            return None
        if self.kind == "plan":
            report = self.path.with_suffix(".json")
            if not report.is_file():
                return None
            return Path(json.loads(report.read_text())["onnx"]).parent
        return self.path if self.path.is_dir() else self.path.parent

    def vocab(self) -> int | None:
        folder = self.config_folder
        config = folder / "config.json" if folder else None
        return json.loads(config.read_text()).get("vocab_size") if config and config.is_file() else None

    def tokenizer(self):
        """The tokenizer next to the artifact (for a .gguf: the one stored in it, read by transformers)."""
        if self.kind == "gguf":
            return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        return AutoTokenizer.from_pretrained(self.config_folder)


def identify(spec: str, label: str | None = None) -> Artifact:
    """An artifact from a path (or the smollm2-135m alias), or one error line saying what to pass."""
    path = Path(spec).expanduser()
    if spec.lower() == loading.SMOLLM2_ALIAS:
        path = Path(loading.resolve(spec))
    if not path.exists():
        raise UserError(f"artifact '{spec}' does not exist: pass a checkpoint folder, an ONNX folder (or model.onnx), a TensorRT .plan or a .gguf")
    name = label or (path.parent.name if path.name == "model.onnx" else path.stem if path.is_file() else path.name)
    if path.is_file() and path.suffix == ".plan":
        return Artifact(name, path, "plan")
    if path.is_file() and path.suffix == ".onnx":
        return Artifact(name, path, "onnx")
    if path.is_file() and path.suffix == ".gguf":
        return Artifact(name, path, "gguf")
    if path.is_dir() and (path / "model.onnx").is_file():
        return Artifact(name, path / "model.onnx", "onnx")
    if path.is_dir() and (path / "config.json").is_file():
        return Artifact(name, path, "checkpoint", Manifest.read(path))
    raise UserError(f"'{spec}' is not an artifact of this tool: pass a checkpoint folder, an ONNX folder (or model.onnx), a TensorRT .plan or a .gguf")


def check_backend(backend: str, device: str) -> None:
    """Fail before any work when a requested backend cannot run here."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "ort":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError("--backend ort needs ONNX Runtime: pip install 'thanos-deploy[cpu]' (or [gpu])") from None
    if backend == "llamacpp":
        binding()
        if device == "cuda":
            raise UserError("--backend llamacpp runs on the CPU here (llama.cpp is built without CUDA): use --device cpu")
    if backend == "tensorrt":
        require_tensorrt()
        if not torch.cuda.is_available():
            raise UserError("--backend tensorrt needs an NVIDIA GPU with CUDA: none is visible here")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")


def check_route(artifact: Artifact, backend: str) -> None:
    if artifact.kind == "plan" and backend != "tensorrt":
        raise UserError(f"'{artifact.path}' is a TensorRT plan: it runs only with --backend tensorrt")
    if artifact.kind == "gguf" and backend != "llamacpp":
        raise UserError(f"'{artifact.path}' is a GGUF file: it runs only with --backend llamacpp")
    if artifact.kind == "onnx" and backend == "llamacpp":
        raise UserError(f"'{artifact.path}' is an ONNX model: llama.cpp runs GGUF files; pass the checkpoint it came from")
    if artifact.kind == "onnx" and backend == "torch":
        raise UserError(f"'{artifact.path}' is an ONNX model: use --backend ort or tensorrt, or pass the checkpoint it came from")


def gguf_type(arts: list[Artifact]) -> str:
    """The type checkpoints are exported to for llama.cpp: that of the .gguf files among the artifacts
    when they agree (so the dense model is timed in the type of the candidates), else f16."""
    types = {file_type(a.path) for a in arts if a.kind == "gguf"}
    return types.pop() if len(types) == 1 and None not in types else GGUF_TYPE


def prepare(artifact: Artifact, backend: str, workdir: Path, device: str, *, gguf: str = GGUF_TYPE) -> Path:
    """The file or folder `backend` opens for `artifact`, exporting or building into `workdir` if needed
    (a checkpoint on llama.cpp: exported as a GGUF of type `gguf`)."""
    check_route(artifact, backend)
    if NATIVE[artifact.kind] == backend:
        return artifact.path
    if backend == "llamacpp":
        path = workdir / f"{artifact.label}-{gguf}.gguf"
        export_gguf(str(artifact.path), path, kind=gguf)
        return path
    onnx = artifact.path
    if artifact.kind == "checkpoint":
        net, tokenizer = loading.load(str(artifact.path))
        dtype = "fp16" if backend == "tensorrt" or device == "cuda" else "fp32"
        onnx = workdir / f"{artifact.label}-{dtype}-onnx"
        write_artifact(net, tokenizer, onnx, dtype=dtype, with_past=True)
        if backend == "ort":
            return onnx
        onnx = onnx / "model.onnx"
    plan = workdir / f"{artifact.label}.plan"
    build_engine(onnx, plan, sparse=True)
    return plan


def backend_options(backend: str, device: str, dtype: str) -> dict:
    if backend == "torch":
        return {"device": device, "dtype": dtype}
    if backend == "ort":
        return {"provider": "cuda" if device == "cuda" else "cpu"}
    return {}


def bytes_on_disk(target: Path) -> int:
    """Weights as the backend reads them: safetensors files, model.onnx + external data, the plan."""
    if target.suffix == ".gguf":
        return target.stat().st_size
    onnx = target / "model.onnx" if target.is_dir() else target
    if onnx.is_file() and onnx.suffix in (".onnx", ".plan"):
        return sum(p.stat().st_size for p in onnx.parent.glob(onnx.name + "*") if p.suffix in (".onnx", ".data", ".plan"))
    return sum(p.stat().st_size for p in target.glob("*.safetensors"))


def what_ran(artifact: Artifact, backend: str, device: str, runner, target: Path) -> tuple[str, bool]:
    """(one line saying which kernels produced the number, whether sparse kernels ran): never a
    speed-up without its cause."""
    storage = artifact.manifest.storage if artifact.manifest else "masked"
    pattern = artifact.manifest.pattern if artifact.manifest else None
    if backend == "torch":
        packed = [m for m in runner.model.modules() if isinstance(m, CompactLinear) and m.packed]
        sparse = sum(type(m.weight.data) is not torch.Tensor for m in packed)
        if sparse:
            return f"torch {device}: semi-structured 2:4 kernels in {sparse}/{len(packed)} packed linears", True
        if packed:
            return f"torch {device}: {pattern} packed, run dense (no sparse kernels on {device}: expect 1.0×)", False
        if storage == "shrunk":
            return f"torch {device}: smaller dense matmuls ({pattern} columns removed)", False
        if storage == "plain":
            return f"torch {device}: smaller dense matmuls and fewer heads ({pattern}: a plain narrower config)", False
        return f"torch {device}: dense matmuls" + (f" ({pattern} zeros multiplied)" if pattern else ""), False
    if backend == "llamacpp":
        return f"llama.cpp CPU: {runner.description} (ggml kernels, weight repacking off, one sequence)", False
    if backend == "ort":
        report = target / "export_report.json" if target.is_dir() else target.parent / "export_report.json"
        two_four = json.loads(report.read_text()).get("two_four") if report.is_file() else None
        note = f"; {two_four['two_four_along_k']}/{two_four['weights']} weights 2:4 along K, run dense" if two_four and two_four["two_four_along_k"] else ""
        return f"ONNX Runtime {device}: dense MatMul kernels{note}", False
    report = target.with_suffix(".json")
    if not report.is_file():
        return "TensorRT: no build report next to the plan, sparse tactics unknown", False
    s = json.loads(report.read_text())["sparsity"]
    names = ", ".join(s["picked_sparse"][:4]) + (" …" if len(s["picked_sparse"]) > 4 else "")
    text = f"TensorRT: {len(s['picked_sparse'])}/{len(s['eligible'])} eligible layers picked a sparse tactic" + (f" ({names})" if names else "")
    return text, bool(s["picked_sparse"])


def pruning_seconds(artifact: Artifact) -> dict | None:
    """Pruning time as the manifest recorded it (math alone, and the whole compress run)."""
    seconds = artifact.manifest.seconds if artifact.manifest else None
    if not seconds:
        return None
    return {"prune": seconds.get("prune"), "total": seconds.get("command", seconds.get("total"))}
