"""`recover`: distil the dense teacher into a pruned student, keeping every pruned weight pruned.

The student is any artifact `compress` writes (masked, packed, shrunk or plain) and comes back in
the same storage. What trains is what is left: every weight of a decoder linear that is exactly
zero in the student has its gradient masked, so AdamW never moves it, and is reset to zero after
each step. N:M stays N:M (checked again when packed), outlier rows stay dense, and shrunk and plain
models keep their shapes. The loss is T²·KL(teacher ‖ student) over next-token distributions at
temperature T, plus `ce_weight` times the cross-entropy on the data; the teacher's logits are
computed for each batch and never stored.

Runs are reproducible: step s trains on windows drawn with (seed, s) from the calibration split, the
learning rate depends on s only, and the state (weights, AdamW moments, log) is checkpointed in
`.OUT.partial/` every evaluation, so a run resumed after a kill writes the same bytes as one that
never stopped. Under torchrun every process takes its share of each global batch and DDP averages
the gradients: the same update as one process on the whole batch, up to rounding.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, data, loading, models
from .bench.artifacts import linear_macs
from .bench.plots import recovery_curves
from .bench.timing import matmul_rate
from .compact.linear import CompactLinear
from .errors import UserError, at_least
from .evaluate import perplexity
from .oneshot import versions
from .pipeline import distributed, resume

DEFAULT_TOKENS = 131_072  # 128 steps of 4 × 256: 12.5 minutes for SmolLM2-135M on a 2-core CPU (bench/studies/recovery.py)
STEPS_PER_DRAW = 64  # windows for this many steps are drawn per pass over the calibration text
STATE, OPTIMIZER = "student-{:06d}.safetensors", "optimizer-{:06d}.safetensors"  # by step: progress.json names the pair


@dataclass(frozen=True)
class Settings:
    """Everything that determines the recovered weights (a resumed run must match it)."""

    data: str = "austen"
    tokens: int | None = None
    max_seconds: float | None = None
    batch_size: int = 4
    seqlen: int = 256
    lr: float = 1e-4
    warmup: float = 0.05
    temperature: float = 1.0
    ce_weight: float = 0.0
    seed: int = 0
    eval_every: int | None = None  # tokens; default: an eighth of the budget
    eval_windows: int = 8
    eval_seqlen: int = 512
    eval_data: str = "austen"

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


def parse_duration(text: str | None) -> float | None:
    """'90s', '20m', '1.5h' or a number of seconds."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
    if not match:
        raise UserError(f"--max-time '{text}' is not a duration: write e.g. 90s, 20m or 1.5h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def learning_rate(step: int, settings: Settings) -> float:
    """Linear warm-up over the first `warmup` of the steps, then a cosine down to a tenth (constant
    after warm-up when only a time budget bounds the run)."""
    total = settings.steps
    warm = max(1, round(settings.warmup * (total or 100)))
    if step < warm:
        return settings.lr * (step + 1) / warm
    if total is None:
        return settings.lr
    done = (step - warm) / max(1, total - warm)
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float, ce_weight: float):
    """(loss, kl, ce): T²·KL(softmax(t/T) ‖ softmax(s/T)) per position, plus ce_weight·CE(s, next token)."""
    s = student.float().flatten(0, 1)
    t = teacher.float().flatten(0, 1)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature**2
    if not ce_weight:
        return kl, kl.detach(), None
    ce = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return kl + ce_weight * ce, kl.detach(), ce.detach()


def frozen_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks (True = trains) of every decoder-linear weight that holds zeros: what pruning removed."""
    masks = {}
    for i, layer in enumerate(models.decoder_layers(model)):
        prefix = models.layer_prefix(model, i)
        for name, module in layer.named_modules():
            if not isinstance(module, (nn.Linear, CompactLinear)):
                continue
            for attr in ("weight", "dense_weight"):
                weight = getattr(module, attr, None)
                if weight is not None and bool((weight == 0).any()):
                    masks[f"{prefix}.{name}.{attr}"] = weight != 0
    return masks


class Windows:
    """The training windows of step s, [batch, seqlen]: drawn with (seed, s // STEPS_PER_DRAW) from
    the calibration split, so any step can be reproduced without replaying the ones before it."""

    def __init__(self, settings: Settings, tokenizer, docs: list[str]):
        self.settings, self.tokenizer, self.docs, self.drawn = settings, tokenizer, docs, {}

    def __call__(self, step: int) -> torch.Tensor:
        s = self.settings
        draw, index = divmod(step, STEPS_PER_DRAW)
        if draw not in self.drawn:
            self.drawn = {draw: data.calibration_tokens(s.data, self.tokenizer, nsamples=STEPS_PER_DRAW * s.batch_size, seqlen=s.seqlen,
                                                        seed=s.seed * 1_000_003 + draw, docs=self.docs)}
        return self.drawn[draw][index * s.batch_size:(index + 1) * s.batch_size]


def _same_model(a: str, b: str) -> bool:
    try:
        return Path(loading.resolve(a)).resolve() == Path(loading.resolve(b)).resolve()
    except (UserError, TypeError):
        return a == b


def check_pair(student: nn.Module, student_tokenizer, teacher: nn.Module, teacher_tokenizer, teacher_name: str) -> None:
    """The teacher must speak the student's vocabulary, token for token."""
    s_vocab, t_vocab = student.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features
    if s_vocab != t_vocab:
        raise UserError(f"teacher '{teacher_name}' has a vocabulary of {t_vocab} tokens, the student {s_vocab}: distil from the dense model the student was pruned from")
    if student_tokenizer is not None and teacher_tokenizer is not None and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError(f"teacher '{teacher_name}' has a different tokenizer from the student's: distil from the dense model the student was pruned from")


def _load_student(student: str):
    folder = Path(student).expanduser()
    if not folder.exists():
        raise UserError(f"'{student}' does not exist: pass the folder `thanos-deploy compress` wrote")
    manifest = checkpoint.read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        raise UserError(f"'{student}' is not a thanos-deploy artifact (no {checkpoint.MANIFEST}): recover trains what "
                        "`thanos-deploy compress` wrote; compress the model first")
    if not manifest.get("pattern") or not manifest.get("sparsity"):
        raise UserError(f"'{student}' is dense (nothing was pruned): recover restores pruned models; compress it first")
    model, tokenizer = loading.load(str(folder), dtype="float32")
    return model, tokenizer, manifest


def _save_state(run: resume.RunFolder, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """The parameters and AdamW moments after step `progress['done']`, in files named by that step
    (written like compress's layers: synced, renamed into place, a full disk reported as such), then
    progress.json pointing at them, then the older pair removed: a kill at any point leaves one
    consistent state. Buffers are not saved: training never changes them."""
    step = progress["done"]
    run.write_tensors(STATE.format(step), params, cast=False)
    moments = {f"{name}::{key}": value for name, p in params.items() for key, value in optimizer.state.get(p, {}).items()}
    run.write_tensors(OPTIMIZER.format(step), moments, cast=False)
    run.progress = progress
    run.write_json(resume.PROGRESS, progress)
    for old in [*run.path.glob("student-*.safetensors"), *run.path.glob("optimizer-*.safetensors")]:
        if old.name not in (STATE.format(step), OPTIMIZER.format(step)):
            old.unlink()


def _load_state(folder: Path, step: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, device) -> None:
    with resume.reading(folder / STATE.format(step)):
        weights = load_file(folder / STATE.format(step), device=str(device))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    moments: dict[str, dict] = {}
    with resume.reading(folder / OPTIMIZER.format(step)):
        for key, value in load_file(folder / OPTIMIZER.format(step), device=str(device)).items():
            name, field = key.split("::", 1)
            moments.setdefault(name, {})[field] = value
    for name, state in moments.items():
        state["step"] = state["step"].cpu()
        optimizer.state[params[name]] = state


def recover(
    student: str,
    out: str | Path,
    *,
    teacher: str | None = None,
    settings: Settings = Settings(),
    device: str = "auto",
    teacher_dtype: str = "auto",
    teacher_device: str | None = None,
    gradient_checkpointing: bool = False,
    resume_run: bool = False,
    overwrite: bool = False,
    on_step=None,
    on_eval=None,
    warn=None,
    status=None,
) -> dict:
    """Distil `teacher` (default: the model the student was pruned from) into `student` and write
    the result to `out` in the student's storage; returns the run's log and summary.
    `on_step(record)` after every step, `on_eval(record)` after every evaluation, `warn(line)`
    for what deserves a look but not a stop, `status(message)` a context manager around long steps."""
    started = time.perf_counter()
    status = status or (lambda message: nullcontext())
    s = settings
    if s.tokens is None and s.max_seconds is None:
        s = Settings(**{**asdict(s), "tokens": DEFAULT_TOKENS})
    if (s.tokens is not None and s.tokens <= 0) or (s.max_seconds is not None and s.max_seconds <= 0):
        raise UserError("the budget is zero: give --tokens N (> 0) or --max-time such as 20m")
    at_least(1, batch_size=s.batch_size, eval_windows=s.eval_windows)
    at_least(2, seqlen=s.seqlen, eval_seqlen=s.eval_seqlen)
    if s.lr <= 0 or s.temperature <= 0 or s.ce_weight < 0 or not 0 <= s.warmup < 1:
        raise UserError("--lr and --temperature must be positive, --ce-weight at least 0 and --warmup in [0, 1)")
    place = distributed.start(device)  # one process, or one of torchrun's (gloo on CPU, NCCL on CUDA)
    rank, world, dev = place.rank, place.size, place.device
    if s.batch_size % world:
        raise UserError(f"--batch-size {s.batch_size} does not split over {world} processes: use a multiple of {world}")
    out = checkpoint.check_output(out, overwrite)
    if Path(student).expanduser().resolve() == out.resolve():
        raise UserError("--out is the student itself: write the recovered model to a new folder")
    with status(f"loading {student}"):
        net, tokenizer, manifest = _load_student(student)
    teacher = teacher or manifest.get("source_model")
    if not teacher:
        raise UserError(f"'{student}' does not name the model it was pruned from: pass --teacher DENSE")
    if warn and manifest.get("source_model") and not _same_model(teacher, manifest["source_model"]):
        warn(f"teacher '{teacher}' is not the model '{student}' was pruned from ('{manifest['source_model']}')")
    if (context := models.context_length(net, s.seqlen)) < s.seqlen:
        raise UserError(f"--seqlen {s.seqlen} is longer than the model's context ({context} tokens): use a smaller --seqlen")
    with status(f"reading data '{s.data}'"):
        docs = data.documents(s.data, "calibration")
        eval_windows = data.windows(data.evaluation_tokens(s.eval_data, tokenizer), models.context_length(net, s.eval_seqlen), s.eval_windows)
    t_dev = loading.pick_device(teacher_device) if teacher_device else dev
    t_dtype = teacher_dtype if teacher_dtype != "auto" else ("bfloat16" if t_dev.type == "cuda" else "float32")
    with status(f"loading teacher {teacher}"):
        teacher_net, teacher_tokenizer = loading.load(teacher, dtype=t_dtype)
    check_pair(net, tokenizer, teacher_net, teacher_tokenizer, teacher)
    teacher_net.to(t_dev).eval().requires_grad_(False)

    fingerprint = {"student": str(Path(student).expanduser().resolve()), **resume.model_identity(Path(student).expanduser()),
                   "student_files": manifest.get("files"), "teacher": teacher, "teacher_dtype": t_dtype, "teacher_device": t_dev.type,
                   **asdict(s), "world": world, "device": dev.type, "versions": versions()}
    opened = {}

    def open_run() -> dict:
        """Process 0 owns the partial folder (the lock, the fingerprint); the others get its progress."""
        opened["run"] = run = resume.RunFolder(out, resume=resume_run, overwrite=overwrite)
        run.unit = "steps"
        try:
            run.check_fingerprint(fingerprint)
        except UserError:
            run.close(discard=run.owned)
            raise
        return run.progress if run.done else {"done": 0, "log": [], "seconds": 0.0}

    progress = _from_rank0(world, rank, open_run)
    run = opened.get("run")
    with resume.guard(run, "thanos-deploy") if run else nullcontext():
        net.to(dev).train().requires_grad_(True)
        if gradient_checkpointing:
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        masks = {name: mask.to(dev) for name, mask in frozen_zeros(net).items()}
        params = dict(net.named_parameters())  # tied weights appear once
        optimizer = torch.optim.AdamW(params.values(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
        if progress["done"]:  # every process reads the state process 0 wrote (one machine)
            _load_state(resume.partial_folder(out), progress["done"], params, optimizer, dev)
        model = DistributedDataParallel(net) if world > 1 else net
        windows = Windows(s, tokenizer, docs)
        flops_per_token = 6 * linear_macs(net, False) + 2 * linear_macs(teacher_net, False)
        rate = matmul_rate(dev) if rank == 0 else None
        log, step = progress["log"], progress["done"]
        teacher_precision = _autocast(t_dev) if t_dtype != "float32" else nullcontext()

        def evaluate(step: int, kl: float | None = None) -> None:
            net.eval()
            ppl = perplexity(net, eval_windows, device=dev)["perplexity"]
            net.train()
            log.append({"step": step, "tokens": step * s.tokens_per_step, "seconds": round(time.perf_counter() - clock, 2),
                        "perplexity": ppl, "kl": kl})
            if on_eval:
                on_eval(log[-1])

        def checkpoint_state(step: int, kl: float) -> None:
            evaluate(step, kl)
            if run:
                _save_state(run, params, optimizer, {"done": step, "log": log, "seconds": time.perf_counter() - clock})
                run.owned = False  # trained steps are the user's: a later failure keeps them for --resume

        def finished(step: int) -> bool:
            """The budget is spent (process 0's clock decides for every process)."""
            over = (s.steps is not None and step >= s.steps) or (s.max_seconds is not None and time.perf_counter() - clock >= s.max_seconds)
            if world > 1:
                flag = torch.tensor([float(over)], device=dev)
                dist.broadcast(flag, src=0)
                over = bool(flag.item())
            return over

        clock = time.perf_counter() - progress["seconds"]  # wall-clock of the run, over every resume
        if step == 0:
            _from_rank0(world, rank, lambda: evaluate(0))
        done = step > 0 and finished(step)  # a fresh run trains at least one step
        while not done:
            t0 = time.perf_counter()
            ids = windows(step)[rank::world].to(dev)
            torch.manual_seed(s.seed * 1_000_003 + step)  # dropout, where a family has it, replays on resume
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, s)
            with torch.no_grad(), teacher_precision:
                teacher_logits = teacher_net(input_ids=ids.to(t_dev), use_cache=False).logits.to(dev)
            with _autocast(dev):
                logits = model(input_ids=ids, use_cache=False).logits
            loss, kl, ce = distillation_loss(logits, teacher_logits, ids, s.temperature, s.ce_weight)
            del teacher_logits, logits
            loss.backward()
            with torch.no_grad():
                for name, mask in masks.items():
                    if params[name].grad is not None:
                        params[name].grad.masked_fill_(~mask, 0)
                torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for name, mask in masks.items():
                    params[name].masked_fill_(~mask, 0)
            figures = torch.stack([kl, ce if ce is not None else torch.zeros_like(kl)]).float()
            if world > 1:
                dist.all_reduce(figures)
                figures /= world
            if not bool(torch.isfinite(figures).all()):
                raise UserError(f"the loss is not finite at step {step + 1}: lower --lr (now {s.lr:g}) and start over with --overwrite")
            step += 1
            took, seconds = time.perf_counter() - t0, time.perf_counter() - clock
            if rank == 0 and on_step:
                tps = s.tokens_per_step / took
                left = (s.steps - step) * (seconds - progress["seconds"]) / (step - progress["done"]) if s.steps else None
                if s.max_seconds is not None:
                    left = min(left if left is not None else math.inf, s.max_seconds - seconds)
                on_step({"step": step, "steps": s.steps, "kl": float(figures[0]), "ce": float(figures[1]) if ce is not None else None,
                         "lr": learning_rate(step - 1, s), "tokens_per_s": tps, "matmul_fraction": tps * flops_per_token / rate,
                         "seconds_left": max(0.0, left) if left is not None else None})
            done = finished(step)
            if step % s.eval_steps == 0 or done:
                _from_rank0(world, rank, lambda: checkpoint_state(step, float(figures[0])))
        seconds = time.perf_counter() - clock
        tokens_per_s = step * s.tokens_per_step / seconds
        result = {"log": log, "steps": step, "tokens": step * s.tokens_per_step, "seconds": round(seconds, 1), "tokens_per_s": tokens_per_s,
                  "matmul_rate": rate, "matmul_fraction": tokens_per_s * flops_per_token / rate if rate else None,
                  "flops_per_token": flops_per_token, "world": world}
        if gradient_checkpointing:
            net.activation_checkpointing_disable()

        def save() -> None:
            with status(f"saving to {out}"):
                _write(net, tokenizer, out, manifest, masks, teacher, s, result, overwrite)
            run.close(discard=True)

        _from_rank0(world, rank, save)
        result["seconds_total"] = round(time.perf_counter() - started, 1)
    return result


def _from_rank0(world: int, rank: int, work):
    """`work()` on process 0, its (picklable) result on every process. An error there stops every
    process (the others with one line naming it) instead of leaving them waiting in a collective."""
    box, failure = [None, None], None
    if rank == 0:
        try:
            box[0] = work()
        except Exception as e:
            if world == 1:
                raise
            failure, box[1] = e, str(e) if isinstance(e, UserError) else f"process 0 failed: {type(e).__name__}: {e}"
    if world > 1:
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        if box[1] is not None:
            raise UserError(box[1])
    return box[0]


def _write(net: nn.Module, tokenizer, out: Path, manifest: dict, masks: dict, teacher: str, s: Settings, result: dict, overwrite: bool) -> None:
    """The recovered model in the student's storage and dtype, with the log and its curve."""
    net.eval().requires_grad_(False)
    params = dict(net.named_parameters())
    for name, mask in masks.items():  # what pruning removed is still exactly zero
        if bool((params[name][~mask] != 0).any()):
            raise RuntimeError(f"{name}: a pruned weight moved during recovery")
    net.to("cpu")
    dtype = loading.DTYPES.get(manifest.get("dtype", "float32"))
    if dtype is not None:
        net.to(dtype)
    log = result["log"]
    recovery = {"teacher": teacher, **asdict(s), "steps": result["steps"], "tokens_trained": result["tokens"], "seconds": result["seconds"],
                "world": result["world"], "perplexity_start": log[0]["perplexity"] if log else None,
                "perplexity_end": log[-1]["perplexity"] if log else None, "final_kl": log[-1].get("kl") if log else None}
    curve = io.BytesIO()
    recovery_curves({f"{manifest.get('pattern')} {manifest.get('method')}": log}, curve, title=f"recover from {teacher}")
    made = {**manifest, "recovery": recovery, "versions": versions(),
            "evaluation": {**(manifest.get("evaluation") or {}), "recovered": {"data": s.eval_data, "perplexity": recovery["perplexity_end"]}}}
    extras = {"recovery.json": (json.dumps({**result, "settings": asdict(s), "teacher": teacher}, indent=2) + "\n").encode(),
              "recovery.png": curve.getvalue()}
    checkpoint.save(net, tokenizer, out, made, overwrite=overwrite, extras=extras)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
