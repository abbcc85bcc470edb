"""What a run is made of, as frozen dataclasses. Each default and each help text is written once,
here; each value is checked once, when its object is built, so a bad one is a UserError before any
work. The CLI builds its options from these fields (cli.py), and `compare`, `bench --plan` and
`recover` take the same objects.

    request = prepare("smollm2-135m", out="out/m-2of4", method="thanos", pattern="2:4", nsamples=32)
    result = oneshot(request)

A field's `flag` is its command-line option and the keyword `prepare` takes for it; fields without
help are not options of their own (the method's options, and the storage that --shrink/--pack ask for).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import loading, targets
from .artifact import STORAGES
from .errors import UserError, at_least
from .methods import OPTION_HELP, Method, get_method
from .patterns import NM, Pattern, Structured, Width, parse_pattern

DEFAULT_TOKENS = 131_072  # recover's budget: 128 steps of 4 × 256, 12.5 minutes for SmolLM2-135M on a 2-core CPU (bench/studies/recovery.py)


def knob(default, help: str = "", *, flag: str | None = None, short: str | None = None):
    """A field with the help text the CLI shows; `flag` when the option is not --field-name."""
    return field(default=default, metadata={"help": help, "flag": flag, "short": short})


def _set(obj, **values) -> None:
    """Normalise fields of a frozen dataclass while it is being built (its checked form)."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def parse_duration(text: str | None) -> float | None:
    """'90s', '20m', '1.5h' or a number of seconds."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
    if not match:
        raise UserError(f"--max-time '{text}' is not a duration: write e.g. 90s, 20m or 1.5h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def keyword_of(f: dataclasses.Field) -> str:
    """The keyword `prepare` takes for a field: its flag, without dashes."""
    return flag_of(f).split("/")[0].lstrip("-").replace("-", "_")


def options_of(cls) -> list[dataclasses.Field]:
    """The fields of a request part that are command-line options."""
    return [f for f in fields(cls) if f.metadata.get("help")]


# ---------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Pruning:
    """What to remove and how: the method, the pattern, the method's options, the linears."""

    method: str | Method = knob("thanos", "thanos, sparsegpt, wanda, magnitude, or activation (Minitron's activation importance; "
                                          "width and structured patterns only)")
    pattern: str | Pattern = knob("2:4", "N:M (e.g. 2:4), unstructured:P, structured:P, or width:mlp=F,heads=F,kv_heads=F (fractions "
                                         "removed) / width:intermediate_size=N,num_attention_heads=N,num_key_value_heads=N (kept): a plain config")
    options: dict = field(default_factory=dict)  # None or missing: the method's default (methods.OPTION_HELP documents each)
    targets: tuple[str, ...] = knob((), "Prune only these linears (repeatable): an exact module name, a suffix such as down_proj, or "
                                        "re:REGEX (llm-compressor's convention); default: every linear of every decoder layer")
    ignore: tuple[str, ...] = knob((), "Leave these linears dense (repeatable; same patterns as --targets)")

    def __post_init__(self):
        method = self.method if isinstance(self.method, Method) else get_method(self.method)
        pattern = parse_pattern(self.pattern)
        _set(self, method=method, pattern=pattern, options=method.options(pattern, dict(self.options)),
             targets=tuple(self.targets or ()), ignore=tuple(self.ignore or ()))
        targets.check_patterns(self.targets, "--targets")
        targets.check_patterns(self.ignore, "--ignore")
        if isinstance(pattern, Width) and (self.targets or self.ignore):
            raise UserError("width patterns remove whole units from every decoder layer alike: drop --targets/--ignore")

    @property
    def label(self) -> str:
        return f"{self.method.name} {self.pattern}"


@dataclass(frozen=True)
class Calibration:
    """The calibration windows: drawn from a text source, or read from a token file."""

    source: str = knob("austen", "Calibration data: austen, c4, wikitext2, or a .txt/.jsonl file", flag="--calib")
    tokens: Path | None = knob(None, "Exact calibration tokens [n, seqlen]: .pt, .npy or .safetensors (instead of --calib)", flag="--calib-tokens")
    nsamples: int = knob(128, "Calibration windows")
    seqlen: int = knob(2048, "Tokens per calibration window (capped by the model's maximum)")
    seed: int = knob(0, "Seed of the calibration windows")

    def __post_init__(self):
        at_least(1, nsamples=self.nsamples)
        at_least(2, seqlen=self.seqlen)
        if self.tokens is not None:
            _set(self, tokens=Path(self.tokens).expanduser())

    def describe(self) -> dict:
        """What the manifest records of the calibration (the windows' shape and hash come from the tokens)."""
        return {"source": str(self.tokens) if self.tokens is not None else self.source, "seed": None if self.tokens is not None else self.seed}


@dataclass(frozen=True)
class Evaluation:
    """Perplexity windows of the evaluation split (Emma and Persuasion for austen, never calibrated on)."""

    windows: int = knob(0, "Also report dense and pruned perplexity on this many windows", flag="--eval-windows")
    data: str = knob("austen", "Evaluation data: austen, wikitext2, c4, or a .txt/.jsonl file", flag="--eval-data")
    seqlen: int = knob(512, "Tokens per evaluation window", flag="--eval-seqlen")

    def __post_init__(self):
        at_least(0, eval_windows=self.windows)
        at_least(2, eval_seqlen=self.seqlen)


@dataclass(frozen=True)
class Tasks:
    """Task accuracy through lm-evaluation-harness, beside perplexity (tasks.py)."""

    names: tuple[str, ...] = knob((), "Also measure accuracy on these lm-eval tasks, comma-separated: the offline austen_cloze and "
                                      "austen_next, or (online) any of lm-eval's, e.g. arc_easy,hellaswag", flag="--tasks")
    num_fewshot: int | None = knob(None, "Examples shown before each task item (default: each task's own, zero for the offline ones)")
    limit: int | None = knob(None, "Score at most this many items of each task (the first ones)")

    def __post_init__(self):
        names = self.names.split(",") if isinstance(self.names, str) else self.names
        _set(self, names=tuple(n.strip() for part in names or () for n in part.split(",") if n.strip()))
        if self.num_fewshot is not None:
            at_least(0, num_fewshot=self.num_fewshot)
        if self.limit is not None:
            at_least(1, limit=self.limit)

    def __bool__(self) -> bool:
        return bool(self.names)


@dataclass(frozen=True)
class Output:
    """Where and how the artifact is written."""

    out: Path | None = knob(None, "Folder to write the artifact to (default for compress: a new folder named after model, method and pattern)",
                            short="-o")
    storage: str = "default"  # default | auto | masked | packed | shrunk | plain (storage_for); the CLI asks with --shrink / --pack
    save_dtype: str = knob("auto", "Save in this dtype: auto (as computed), float32, float16 or bfloat16")
    overwrite: bool = knob(False, "Replace --out if it exists")
    resume: bool = knob(False, "Continue an unfinished run of the same command from its last checkpoint")

    def __post_init__(self):
        if self.out is not None:
            _set(self, out=Path(self.out).expanduser())
        if self.storage not in ("default", "auto", *STORAGES):
            raise UserError(f"unknown storage '{self.storage}': choose auto, {', '.join(STORAGES)}")
        if self.save_dtype != "auto" and self.save_dtype not in loading.DTYPES:
            raise UserError(f"unknown --save-dtype '{self.save_dtype}': choose auto, {', '.join(loading.DTYPES)}")
        if self.resume and self.out is None:
            raise UserError("--resume continues a run that writes an artifact: pass --out")

    @property
    def dtype(self):
        """The torch dtype to save in; None: as computed."""
        return loading.DTYPES.get(self.save_dtype)


@dataclass(frozen=True)
class Execution:
    """Where and how the work runs."""

    device: str = knob("auto", "auto (CUDA when present), cpu or cuda")
    dtype: str = knob("auto", "Model dtype while working: auto (as stored), float32, float16 or bfloat16")
    batch_tokens: int = knob(8192, "Tokens per calibration forward batch (bounds memory)")
    processes: int = knob(1, "Run as this many processes through torch's launcher (as torchrun --nproc-per-node N): each takes its share "
                             "of the windows; one GPU each on CUDA", flag="--nproc")
    offload: bool | None = knob(None, "Read one decoder layer at a time from disk (default: when the model would not fit in memory)",
                                flag="--offload/--no-offload")
    activations_on_disk: bool | None = knob(None, "Keep the calibration activations between layers on disk, read one batch at a time "
                                                  "(default: when they would not fit in memory)", flag="--activations-on-disk/--activations-in-memory")

    def __post_init__(self):
        loading.pick_device(self.device)  # a CUDA device asked for where there is none fails here
        if self.dtype != "auto" and self.dtype not in loading.DTYPES:
            raise UserError(f"unknown dtype '{self.dtype}': choose auto, {', '.join(loading.DTYPES)}")
        at_least(1, batch_tokens=self.batch_tokens, nproc=self.processes)


# ---------------------------------------------------------------------------------------------- compress


@dataclass(frozen=True)
class CompressRequest:
    """Everything `oneshot` needs, checked part by part and across the parts (storage against
    pattern, --offload against what it cannot do). The storage is resolved: masked, packed,
    shrunk or plain."""

    model: str
    pruning: Pruning = Pruning()
    calibration: Calibration = Calibration()
    output: Output = Output()
    execution: Execution = Execution()
    evaluation: Evaluation = Evaluation()

    def __post_init__(self):
        storage = storage_for(self.pruning.pattern, self.output.storage)
        _set(self, output=replace(self.output, storage=storage))
        if self.output.out is None and storage != "masked":
            raise UserError(f"{storage} storage is written to disk: pass an output folder, or keep the model in memory with storage='masked'")
        if self.execution.offload and storage != "masked":
            raise UserError(f"--offload writes masked checkpoints, not {storage}: drop --offload, or drop --shrink/--pack and run "
                            "`thanos-deploy shrink` or `pack` on the output")
        if self.execution.offload and self.evaluation.windows:
            raise UserError("--offload never holds the whole model, so it cannot evaluate it: drop --eval-windows and run `thanos-deploy eval` on the output")

    @property
    def offload_allowed(self) -> bool:
        """Whether --offload may switch on by itself (it writes masked artifacts and never evaluates)."""
        return self.output.storage == "masked" and self.evaluation.windows == 0 and self.output.out is not None


def storage_for(pattern: Pattern, storage: str) -> str:
    """The storage of an artifact: `auto` turns the zeros into savings (N:M packed, structured
    shrunk, width plain, unstructured masked); `default` is what `compress` writes without --shrink
    or --pack (plain for width patterns, masked otherwise); an explicit one must suit the pattern."""
    if storage == "auto":
        return "packed" if isinstance(pattern, NM) else "shrunk" if isinstance(pattern, Structured) else "plain" if isinstance(pattern, Width) else "masked"
    if storage == "default":
        return "plain" if isinstance(pattern, Width) else "masked"
    if isinstance(pattern, Width) and storage not in ("plain", "masked"):
        raise UserError(f"{pattern} is written as a plain Hugging Face checkpoint: drop --shrink/--pack")
    if storage == "plain" and not isinstance(pattern, Width):
        raise UserError(f"plain storage needs a width pattern (width:mlp=F,heads=F), not {pattern}")
    if storage == "shrunk" and not isinstance(pattern, Structured):
        raise UserError(f"--shrink needs a structured pattern (structured:P), not {pattern}; use --pack for N:M")
    if storage == "packed" and not isinstance(pattern, NM):
        raise UserError(f"--pack needs an N:M pattern (e.g. 2:4), not {pattern}; use --shrink for structured")
    return storage


def storage_from_flags(shrink: bool, pack: bool) -> str:
    """The storage `--shrink` / `--pack` ask for."""
    if shrink and pack:
        raise UserError("--shrink and --pack exclude each other: --shrink is for structured patterns, --pack for N:M")
    return "shrunk" if shrink else "packed" if pack else "default"


PARTS = {"pruning": Pruning, "calibration": Calibration, "output": Output, "execution": Execution, "evaluation": Evaluation}


def prepare(model: str, **given) -> CompressRequest:
    """A checked compress request from keyword arguments named as the command line's options:
    out=, method=, pattern=, the method's options (alpha=, block_size=, …), targets=, calib=,
    nsamples=, seqlen=, device=, nproc=, eval_windows=, storage= (or shrink=/pack=) …"""
    given = dict(given)
    shrink, pack = given.pop("shrink", False), given.pop("pack", False)
    if shrink or pack:
        given["storage"] = storage_from_flags(shrink, pack)
    options = {name: given.pop(name) for name in list(given) if name in OPTION_HELP}
    parts = {}
    for name, cls in PARTS.items():
        names = {keyword_of(f) if f.metadata.get("help") else f.name: f.name for f in fields(cls)}
        parts[name] = cls(**{names[k]: given.pop(k) for k in list(given) if k in names})
    if given:
        raise UserError(f"unknown option(s) {', '.join(sorted(given))}: see `thanos-deploy compress --help` for what a request takes")
    if options:
        parts["pruning"] = Pruning(parts["pruning"].method, parts["pruning"].pattern, {**parts["pruning"].options, **options},
                                   parts["pruning"].targets, parts["pruning"].ignore)
    return CompressRequest(model, **parts)


# ---------------------------------------------------------------------------------------------- recover


@dataclass(frozen=True)
class Training:
    """Everything that decides the recovered weights (a resumed run must match it)."""

    data: str = knob("austen", "Training text, the calibration split: austen, wikitext2, c4, or a .txt/.jsonl file")
    tokens: int | None = knob(None, f"Tokens to train on (default {DEFAULT_TOKENS:,} unless --max-time is given)")
    max_time: str | None = knob(None, "Time budget such as 20m or 1.5h; with --tokens, whichever ends first")
    batch_size: int = knob(4, "Windows per step (split over the processes)")
    seqlen: int = knob(256, "Tokens per training window")
    lr: float = knob(1e-4, "AdamW peak learning rate (warm-up, then cosine to a tenth)")
    warmup: float = knob(0.05, "Fraction of the steps spent warming up")
    temperature: float = knob(1.0, "Distillation temperature T (loss T²·KL)")
    ce_weight: float = knob(0.0, "Weight of the next-token cross-entropy added to the KL")
    seed: int = knob(0, "Seed of the training windows")
    eval_every: int | None = knob(None, "Evaluate (and checkpoint) every this many tokens (default: an eighth of the budget)")

    def __post_init__(self):
        seconds = parse_duration(self.max_time)
        if self.tokens is None and seconds is None:
            _set(self, tokens=DEFAULT_TOKENS)
        if (self.tokens is not None and self.tokens <= 0) or (seconds is not None and seconds <= 0):
            raise UserError("the budget is zero: give --tokens N (> 0) or --max-time such as 20m")
        at_least(1, batch_size=self.batch_size)
        at_least(2, seqlen=self.seqlen)
        if self.eval_every is not None:
            at_least(1, eval_every=self.eval_every)
        if self.lr <= 0 or self.temperature <= 0 or self.ce_weight < 0 or not 0 <= self.warmup < 1:
            raise UserError("--lr and --temperature must be positive, --ce-weight at least 0 and --warmup in [0, 1)")

    @property
    def max_seconds(self) -> float | None:
        return parse_duration(self.max_time)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seqlen

    @property
    def steps(self) -> int | None:
        return None if self.tokens is None else math.ceil(self.tokens / self.tokens_per_step)

    @property
    def eval_steps(self) -> int:
        """Steps between evaluations (and checkpoints): `eval_every` tokens, else an eighth of the
        run, else (a time budget alone) 16."""
        if self.eval_every:
            return max(1, math.ceil(self.eval_every / self.tokens_per_step))
        return max(1, math.ceil(self.steps / 8)) if self.steps else 16


@dataclass(frozen=True)
class Teacher:
    """The dense model distilled from, and where it runs."""

    model: str | None = knob(None, "The dense model to distil from (default: the model the student was pruned from, per its manifest)",
                             flag="--teacher")
    dtype: str = knob("auto", "Teacher precision: auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16", flag="--teacher-dtype")
    device: str | None = knob(None, "Keep the teacher on another device, e.g. cpu to offload it from the GPU", flag="--teacher-device")

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in loading.DTYPES:
            raise UserError(f"unknown --teacher-dtype '{self.dtype}': choose auto, {', '.join(loading.DTYPES)}")
        if self.device is not None:
            loading.pick_device(self.device)


@dataclass(frozen=True)
class Memory:
    """How `recover` trades time for memory."""

    gradient_checkpointing: bool = knob(False, "Recompute activations in the backward pass, a decoder layer at a time: less memory, "
                                               "about a third more time")
    cpu_offload: bool = knob(False, "GPU runs: keep the parameter, gradient and optimizer shards in host memory between uses "
                                    "(fewer GPUs for a large model, slower)")


RECOVER_EVALUATION = Evaluation(windows=8)


@dataclass(frozen=True)
class RecoverRequest:
    """Everything `recover` needs: the student artifact, its teacher, the training and its
    evaluation, where the result goes, where the work runs."""

    student: str
    output: Output
    teacher: Teacher = Teacher()
    training: Training = Training()
    evaluation: Evaluation = RECOVER_EVALUATION
    device: str = "auto"
    memory: Memory = Memory()
    tasks: Tasks = Tasks()  # accuracy measured at every evaluation, beside perplexity

    def __post_init__(self):
        if self.output.out is None:
            raise UserError("recover writes a new artifact: pass --out")
        if self.output.storage != "default" or self.output.save_dtype != "auto":
            raise UserError("recover writes the student's own storage and dtype: drop the storage and --save-dtype")
        at_least(1, eval_windows=self.evaluation.windows)
        loading.pick_device(self.device)
        if Path(self.student).expanduser().resolve() == self.output.out.resolve():
            raise UserError("--out is the student itself: write the recovered model to a new folder")
