"""The memory plan of a `recover` run: before any work, what each process will hold (parameters,
gradients, optimizer states, the gathered layers, the teacher, activations, logits) against what
its device has. A plan that does not fit is refused in one line naming what would make it fit;
`recover --plan-only` prints it for any model config without loading weights (size an 8B or 70B
run on a laptop).

The figures are estimates of the peaks, in bytes per process with N processes, P student and Q
teacher parameters, compute in bfloat16 on GPUs (c = 2 bytes) and float32 on the CPU (c = 4):
- parameters 4P/N, gradients 4P/N, AdamW moments 8P/N: float32 shards (FSDP2), exact up to
  padding (the run log prints the measured shard bytes); in host memory with --cpu-offload;
- gathered: c × (the root group: embeddings, final norm, head; plus two decoder layers, the one
  computing and the one prefetched);
- teacher: its shard tQ/N plus its gathered root and layers, or tQ whole on --teacher-device;
- activations: per decoder layer and token c × (6·hidden + 5·intermediate) kept for backward (with
  --gradient-checkpointing only each layer's input, c × hidden, and one layer's working set);
- logits: 6 float32 copies (student, teacher, their log-softmaxes, gradients) of a chunk of
  positions × vocabulary (of the whole local batch where the family's logits cannot be chunked);
- runtime: the framework itself (1.5 GB on a GPU: context and allocator slack; 0.5 GB on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import AutoModelForCausalLM

from .. import loading, models
from ..errors import UserError
from ..pipeline.offload import available_memory
from . import loss

GB = 1e9
SLACK = 0.9  # the plan may use this share of a device: the allocator fragments the rest
RUNTIME = {"cuda": 1.5 * GB, "cpu": 0.5 * GB}


@dataclass(frozen=True)
class Shape:
    """What a plan needs to know of a model."""

    parameters: int
    root: int  # outside the decoder layers: embeddings, final norm, head (tied ones once)
    largest_layer: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int


def shape_of(model: torch.nn.Module) -> Shape:
    """The shape of `model` (on any device, meta included; tied parameters counted once)."""
    counts = {n: p.numel() for n, p in model.named_parameters()}
    prefix = models.layer_prefix(model, 0).rpartition(".")[0] + "."
    per_layer: dict[str, int] = {}
    for name, n in counts.items():
        if name.startswith(prefix):
            index = name[len(prefix):].split(".")[0]
            per_layer[index] = per_layer.get(index, 0) + n
    config = model.config
    return Shape(parameters=sum(counts.values()), root=sum(n for name, n in counts.items() if not name.startswith(prefix)),
                 largest_layer=max(per_layer.values()), layers=len(per_layer), hidden=config.hidden_size,
                 intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size, vocab=config.vocab_size)


def shape_from_config(spec: str) -> Shape:
    """A model's shape from its config alone (built on the meta device: nothing is read but the
    config). For a shrunk or packed artifact that is its dense shape, an upper bound."""
    _, config = loading.load_config(spec)
    with torch.device("meta"):
        return shape_of(AutoModelForCausalLM.from_config(config))


@dataclass(frozen=True)
class Setting:
    """How the run is laid out (what the plan's options change)."""

    processes: int = 1
    device: str = "cpu"  # cpu or cuda
    batch_size: int = 4
    seqlen: int = 256
    gradient_checkpointing: bool = False
    cpu_offload: bool = False
    teacher_bytes: int = 4  # per teacher parameter (2: bfloat16)
    teacher_apart: bool = False  # the teacher whole on another device (--teacher-device)
    chunked: bool = True


@dataclass
class Plan:
    setting: Setting
    capacity: float | None  # bytes a process may use on its device (None: unknown)
    device_bytes: dict[str, float] = field(default_factory=dict)
    host_bytes: dict[str, float] = field(default_factory=dict)
    fixes: list[str] = field(default_factory=list)  # what would make a plan that does not fit fit

    @property
    def total(self) -> float:
        return sum(self.device_bytes.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= SLACK * self.capacity

    def as_dict(self) -> dict:
        return {"setting": self.setting.__dict__, "capacity": self.capacity, "device": self.device_bytes, "host": self.host_bytes,
                "total": self.total, "fits": self.fits, "fixes": self.fixes}


def plan(student: Shape, teacher: Shape, setting: Setting, capacity: float | None) -> Plan:
    """Bytes per process, on its device and in host memory."""
    s, n = setting, setting.processes
    c = 2 if s.device == "cuda" else 4
    states = {"parameters": 4 * student.parameters / n, "gradients": 4 * student.parameters / n, "optimizer states": 8 * student.parameters / n}
    tokens = s.batch_size // n * s.seqlen
    working = 6 * student.hidden + 5 * student.intermediate
    activations = (student.layers * tokens * c * student.hidden + tokens * c * working) if s.gradient_checkpointing else student.layers * tokens * c * working
    positions = min(tokens, loss.chunk_positions(student.vocab)) if s.chunked else tokens
    device = {} if s.cpu_offload else dict(states)
    device["gathered layers"] = c * (student.root + 2 * student.largest_layer)
    if not s.teacher_apart:
        device["teacher"] = s.teacher_bytes * (teacher.parameters / n + teacher.root + 2 * teacher.largest_layer)
    device["activations"] = activations + tokens * 4 * (student.hidden + teacher.hidden)
    device["logits"] = 6 * 4 * positions * student.vocab
    device["runtime"] = RUNTIME[s.device]
    host = dict(states) if s.cpu_offload else {}
    if s.teacher_apart:
        host["teacher"] = s.teacher_bytes * teacher.parameters
    return Plan(s, capacity, device, host)


def planned(student: Shape, teacher: Shape, setting: Setting, capacity: float | None) -> Plan:
    """The plan, with what would make it fit when it does not."""
    made = plan(student, teacher, setting, capacity)
    if not made.fits:
        made.fixes = alternatives(student, teacher, setting, capacity)
    return made


def alternatives(student: Shape, teacher: Shape, setting: Setting, capacity: float) -> list[str]:
    """What would make a plan that does not fit fit: more processes, --cpu-offload,
    --gradient-checkpointing, a smaller batch (each alone)."""
    fits = lambda **change: plan(student, teacher, replace(setting, **change), capacity).fits  # noqa: E731
    shared = setting.device == "cpu"  # processes on the CPU share the host's memory: each gets less
    more = next((n for n in (2, 4, 8, 16, 32, 64, 128) if n > setting.processes and setting.batch_size % n == 0
                 and plan(student, teacher, replace(setting, processes=n), capacity * setting.processes / n if shared else capacity).fits), None)
    found = []
    if more:
        found.append(f"{more} processes (--nproc {more}, or {more} GPUs)")
    if setting.device == "cuda" and not setting.cpu_offload and fits(cpu_offload=True):
        found.append("--cpu-offload")
    if not setting.gradient_checkpointing and fits(gradient_checkpointing=True):
        found.append("--gradient-checkpointing")
    smaller = next((b for b in range(setting.batch_size - setting.processes, 0, -setting.processes) if fits(batch_size=b)), None)
    if smaller:
        found.append(f"--batch-size {smaller}")
    return found


def check(student: Shape, teacher: Shape, setting: Setting, capacity: float | None) -> Plan:
    """The plan, or one UserError when it does not fit, naming the options that would."""
    made = planned(student, teacher, setting, capacity)
    if made.fits:
        return made
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in made.device_bytes.items())
    fix = f"it fits with {' or '.join(made.fixes)}" if made.fixes else "nothing here makes it fit: use more or larger devices"
    raise UserError(f"recover needs about {made.total / GB:.1f} GB per process on {setting.device} and a process has {capacity / GB:.1f} GB "
                    f"({parts} GB): {fix}; `thanos-deploy recover STUDENT --plan-only` shows the plan")


def capacity(device: torch.device, processes: int) -> float | None:
    """Bytes one process may use: its GPU's memory, or its share of the host's available memory."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    available = available_memory()
    return available / processes if available else None


def parse_size(text: str) -> float:
    """'80GB', '141G', '512MB' or a number of gigabytes."""
    value = str(text).strip().upper().removesuffix("B")
    factor = {"G": GB, "M": 1e6, "T": 1e12}.get(value[-1:], None)
    try:
        return float(value[:-1]) * factor if factor else float(value) * GB
    except ValueError:
        raise UserError(f"--device-memory '{text}' is not a size: write e.g. 80GB or 141GB") from None
