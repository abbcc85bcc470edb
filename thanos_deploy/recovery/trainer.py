"""The distillation trainer: the student sharded over the processes with FSDP2, pruned weights held
at zero on every shard.

One code path for 1…N processes and GPUs (World.shard): the student's parameters, gradients and
AdamW moments live in shards, one decoder layer gathered at a time; float32 masters, bfloat16
compute on CUDA; `cpu_offload` keeps the shards in host memory; activation checkpointing per
decoder layer on request. The teacher is sharded too (forward only), or placed whole on
`--teacher-device`.

What trains is what is left: every weight of a decoder linear that is exactly zero in the student
has its gradient masked, so AdamW never moves it, and is reset to zero after each step. The masks
are taken from each process's own shards (whole rows: an N:M pattern along the inputs stays whole).

Step s trains on windows drawn with (seed, s) from the calibration split and its learning rate
depends on s only; the sharded state is checkpointed with torch.distributed.checkpoint, so a run
resumed after a kill writes the same bytes as one that never stopped (same number of processes),
and can resume on another number.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .. import data, models, tasks
from ..compact.linear import CompactLinear
from ..errors import UserError
from ..evaluate import next_token_nll
from ..measure import linear_macs, matmul_rate
from ..pipeline.distributed import World
from ..progress import Reporter
from ..request import Tasks, Training
from ..staging import PartialFolder
from . import loss
from .checks import Setup

STEPS_PER_DRAW = 64  # windows for this many steps are drawn per pass over the calibration text
STATE = "state-{:06d}"  # the sharded checkpoint after a step, a folder written by every process
EVAL_BATCH_TOKENS = 1024  # evaluation batches: their float32 logits are about 4 × tokens × vocabulary bytes


def learning_rate(step: int, training: Training) -> float:
    """Linear warm-up over the first `warmup` of the steps, then a cosine down to a tenth (constant
    after warm-up when only a time budget bounds the run)."""
    total = training.steps
    warm = max(1, round(training.warmup * (total or 100)))
    if step < warm:
        return training.lr * (step + 1) / warm
    if total is None:
        return training.lr
    done = (step - warm) / max(1, total - warm)
    return training.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))


def frozen_zeros(model: nn.Module) -> list[str]:
    """Names of every decoder-linear weight that holds zeros: what pruning removed."""
    names = []
    for i, layer in enumerate(models.decoder_layers(model)):
        prefix = models.layer_prefix(model, i)
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, CompactLinear)):
                names += [f"{prefix}.{name}.{attr}" for attr in ("weight", "dense_weight")
                          if getattr(module, attr, None) is not None and bool((getattr(module, attr) == 0).any())]
    return names


class Windows:
    """The training windows of step s, [batch, seqlen]: drawn with (seed, s // STEPS_PER_DRAW) from
    the calibration split, so any step can be reproduced without replaying the ones before it."""

    def __init__(self, training: Training, tokenizer, docs: list[str]):
        self.training, self.tokenizer, self.docs, self.drawn = training, tokenizer, docs, {}

    def __call__(self, step: int) -> torch.Tensor:
        t = self.training
        draw, index = divmod(step, STEPS_PER_DRAW)
        if draw not in self.drawn:
            self.drawn = {draw: data.calibration_tokens(t.data, self.tokenizer, nsamples=STEPS_PER_DRAW * t.batch_size, seqlen=t.seqlen,
                                                        seed=t.seed * 1_000_003 + draw, docs=self.docs)}
        return self.drawn[draw][index * t.batch_size:(index + 1) * t.batch_size]


class Distiller(nn.Module):
    """The student with the loss inside its forward: FSDP2 gathers the root group (embeddings,
    final norm, head) for the root's forward only, and the chunked loss multiplies the head out
    there. Without teacher outputs it returns the logits (evaluation)."""

    def __init__(self, student: nn.Module, training: Training, chunk: int | None):
        super().__init__()
        self.student, self.settings, self.chunk = student, training, chunk  # (nn.Module's own `training` is its mode)

    def forward(self, ids: torch.Tensor, teacher_out: torch.Tensor | None = None, teacher_head: nn.Module | None = None):
        t = self.settings
        if teacher_out is None:
            return self.student(input_ids=ids, use_cache=False).logits
        if self.chunk is None:
            return loss.whole(self.student(input_ids=ids, use_cache=False).logits, teacher_out, ids, t.temperature, t.ce_weight)
        hidden = self.student.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return loss.chunked(hidden, self.student.get_output_embeddings(), teacher_out, teacher_head, ids, t.temperature, t.ce_weight, self.chunk)


class TeacherView(nn.Module):
    """The teacher's forward as the loss needs it: the last hidden state (chunked loss) or logits."""

    def __init__(self, teacher: nn.Module, hidden: bool):
        super().__init__()
        self.teacher, self.hidden = teacher, hidden

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.hidden:
            return self.teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state
        return self.teacher(input_ids=ids, use_cache=False).logits


class Trainer:
    """This process's share of the training: the sharded student, its optimizer and masks, the teacher."""

    def __init__(self, setup: Setup, training: Training, world: World, *, gradient_checkpointing: bool = False, cpu_offload: bool = False):
        self.setup, self.training, self.world, self.device = setup, training, world, world.device
        student, teacher = setup.student, setup.teacher
        exact = setup.chunked
        self.flops_per_token = 6 * linear_macs(student, False) + 2 * linear_macs(teacher, False)
        zeros = frozen_zeros(student)
        if gradient_checkpointing:
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.distiller = Distiller(student.to(self.device).train().requires_grad_(True), training,
                                   loss.chunk_positions(student.config.vocab_size) if exact else None)
        world.shard(self.distiller, models.decoder_layers(student), bf16=self.device.type == "cuda", offload=cpu_offload)
        self.teacher = TeacherView(teacher, hidden=exact)
        self.teacher_sharded = setup.teacher_device == self.device
        if self.teacher_sharded:  # frozen: the root too gives its parameters back after each forward
            world.shard(self.teacher, models.decoder_layers(teacher), reshard_root=True)
            self.teacher_head = teacher.get_output_embeddings()  # whole only inside World.gathered
        else:  # the teacher whole on its own device; its head (for the chunked loss) where the student is
            self.teacher_head = nn.Linear(0, 0).requires_grad_(False)
            head = teacher.get_output_embeddings()
            self.teacher_head.weight = nn.Parameter(head.weight.detach().to(self.device), requires_grad=False)
            self.teacher_head.bias = None if head.bias is None else nn.Parameter(head.bias.detach().to(self.device), requires_grad=False)
        self.params = {f"student.{name}": p for name, p in student.named_parameters()}  # tied weights appear once
        self.masks = {f"student.{name}": world.local(self.params[f"student.{name}"]) != 0 for name in zeros}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=training.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.windows = Windows(training, setup.tokenizer, setup.documents)
        self.teacher_precision = _autocast(setup.teacher_device) if setup.teacher_dtype != "float32" else nullcontext()
        self.shard_bytes = None

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step on this process's share of step `step`'s windows; (KL, CE) averaged
        over the processes (CE 0 when not trained on)."""
        t, local = self.training, self.world.local
        ids = self.windows(step)[self.world.rank::self.world.size].to(self.device)
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout, where a family has it, replays on resume
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, t)
        with torch.no_grad(), self.teacher_precision:
            teacher_out = self.teacher(ids.to(self.setup.teacher_device)).to(self.device)
        with self.world.gathered(self.teacher) if self.teacher_sharded and self.distiller.chunk else nullcontext():
            total, kl, ce = self.distiller(ids, teacher_out, self.teacher_head)
        del teacher_out
        total.backward()
        with torch.no_grad():
            for name, mask in self.masks.items():
                if self.params[name].grad is not None:
                    local(self.params[name].grad).masked_fill_(~mask, 0)
            torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
            self.optimizer.step()
            if self.shard_bytes is None:
                self.shard_bytes = self.state_bytes()
            self.optimizer.zero_grad(set_to_none=True)
            for name, mask in self.masks.items():
                local(self.params[name]).masked_fill_(~mask, 0)
        figures = self.world.mean(torch.stack([kl, ce if ce is not None else torch.zeros_like(kl)]).float())
        if not bool(torch.isfinite(figures).all()):
            raise UserError(f"the loss is not finite at step {step + 1}: lower --lr (now {t.lr:g}) and start over with --overwrite")
        return figures

    def state_bytes(self) -> dict:
        """Bytes this process holds of the parameters, gradients and optimizer states (its shards)."""
        local = self.world.local
        size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
        return {"parameters": sum(size(p) for p in self.params.values()),
                "gradients": sum(size(p.grad) for p in self.params.values() if p.grad is not None),
                "optimizer": sum(size(v) for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim())}

    def perplexity(self) -> float:
        """Perplexity on the evaluation windows, each process scoring its share: the summed
        cross-entropies are added over the processes, so every process gets the same figure. A
        sharded forward is a collective, so a process with fewer windows scores a copy of its last
        one (dropped) to take part in every batch."""
        windows = self.setup.eval_windows
        share = windows[self.world.share(len(windows))]
        batch = data.batch_size(windows.shape[1], EVAL_BATCH_TOKENS)
        batches = math.ceil(math.ceil(len(windows) / self.world.size) / batch)  # those of the largest share
        nll = 0.0
        self.distiller.eval()
        with torch.no_grad():
            for b in range(batches):
                ids = share[b * batch:(b + 1) * batch]
                real = len(ids)
                if real < batch:  # padded with copies of a window, dropped below
                    ids = torch.cat([ids, (share[-1:] if len(share) else windows[:1]).expand(batch - real, -1)])
                logits = self.distiller(ids.to(self.device))
                if real:
                    nll += next_token_nll(logits[:real], ids[:real])
        self.distiller.train()
        return math.exp(sum(self.world.gather(nll)) / windows[:, 1:].numel())

    def accuracy(self, scored: Tasks) -> dict | None:
        """lm-eval's tasks on the student as it is now. Every process runs the same requests (the
        decoder layers' forwards are collectives), the root group gathered whole meanwhile."""
        if not scored:
            return None
        self.distiller.eval()
        with self.world.gathered(self.distiller):
            found = tasks.run(self.distiller.student, self.setup.tokenizer, list(scored.names), num_fewshot=scored.num_fewshot,
                              limit=scored.limit)
        self.distiller.train()
        return found

    def save(self, run: PartialFolder | None, folder: Path, progress: dict) -> None:
        """Every process writes its shards into a temporary folder; then process 0 renames it, points
        progress.json at it and removes the older one: a kill at any point leaves one consistent state."""
        step = progress["done"]
        tmp = folder / f".{STATE.format(step)}.tmp"
        self.world.save_sharded(self.distiller, self.optimizer, tmp)

        def publish() -> None:
            os.replace(tmp, folder / STATE.format(step))
            run.record(progress)
            for old in folder.glob("state-*"):
                if old.name != STATE.format(step):
                    shutil.rmtree(old)
            run.owned = False  # trained steps are the user's: a later failure keeps them for --resume

        self.world.first(publish)

    def load(self, folder: Path, step: int) -> None:
        """The state a run saved after step `step`, on any number of processes."""
        path = folder / STATE.format(step)
        if not (path / ".metadata").is_file():
            raise UserError(f"'{path}' is not a complete checkpoint: rerun with --overwrite instead of --resume")
        self.world.load_sharded(self.distiller, self.optimizer, path)

    def full_student(self) -> dict:
        """The trained student's whole state on process 0 ({} on the others); every process calls it."""
        state = self.world.full_state(self.distiller)
        return {k.removeprefix("student."): v for k, v in state.items()}


def train(trainer: Trainer, run: PartialFolder | None, folder: Path, progress: dict, reporter: Reporter, scored: Tasks = Tasks()) -> dict:
    """Steps until the budget is spent (process 0's clock decides for every process), evaluating and
    checkpointing every `eval_steps`; returns the log and the throughput."""
    t, world = trainer.training, trainer.world
    log, step = progress["log"], progress["done"]
    rate = matmul_rate(trainer.device) if world.rank == 0 else None
    clock = time.perf_counter() - progress["seconds"]  # wall-clock of the run, over every resume

    def evaluate(kl: float | None = None) -> None:
        log.append({"step": step, "tokens": step * t.tokens_per_step, "seconds": round(time.perf_counter() - clock, 2),
                    "perplexity": trainer.perplexity(), "kl": kl, **({"tasks": trainer.accuracy(scored)} if scored else {})})
        reporter.record("recover.evaluation", log[-1])
        if step:
            trainer.save(run, folder, {"done": step, "log": log, "seconds": time.perf_counter() - clock})

    def finished() -> bool:
        seconds = time.perf_counter() - clock
        return world.broadcast((t.steps is not None and step >= t.steps) or (t.max_seconds is not None and seconds >= t.max_seconds))

    if step == 0:
        evaluate()
    done = step > 0 and finished()  # a fresh run trains at least one step
    while not done:
        t0 = time.perf_counter()
        figures = trainer.step(step)
        step += 1
        seconds, took = time.perf_counter() - clock, time.perf_counter() - t0
        left = (t.steps - step) * (seconds - progress["seconds"]) / (step - progress["done"]) if t.steps else None
        if t.max_seconds is not None:
            left = min(left if left is not None else math.inf, t.max_seconds - seconds)
        reporter.record("recover.step", {"step": step, "steps": t.steps, "kl": float(figures[0]), "ce": float(figures[1]) if t.ce_weight else None,
                                         "lr": learning_rate(step - 1, t), "tokens_per_s": t.tokens_per_step / took,
                                         "matmul_fraction": t.tokens_per_step / took * trainer.flops_per_token / rate if rate else None,
                                         "seconds_left": max(0.0, left) if left is not None else None})
        done = finished()
        if step % t.eval_steps == 0 or done:
            evaluate(float(figures[0]))
    seconds = time.perf_counter() - clock
    tokens_per_s = step * t.tokens_per_step / seconds
    return {"log": log, "steps": step, "tokens": step * t.tokens_per_step, "seconds": round(seconds, 1), "tokens_per_s": tokens_per_s,
            "matmul_rate": rate, "matmul_fraction": tokens_per_s * trainer.flops_per_token / rate if rate else None,
            "flops_per_token": trainer.flops_per_token, "world": world.size, "shard_bytes": trainer.shard_bytes,
            "peak_device_bytes": torch.cuda.max_memory_allocated(trainer.device) if trainer.device.type == "cuda" else None}


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (the teacher in bfloat16); float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
