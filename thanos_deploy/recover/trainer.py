"""The distillation trainer: one process's share of every step, the pruned weights held at zero.

What trains is what is left: every weight of a decoder linear that is exactly zero in the student
has its gradient masked, so AdamW never moves it, and is reset to zero after each step. The loss is
T²·KL(teacher ‖ student) over next-token distributions at temperature T, plus `ce_weight` times the
cross-entropy on the data; the teacher's logits are computed for each batch and never stored.

Step s trains on windows drawn with (seed, s) from the calibration split and its learning rate
depends on s only, so a run resumed from a checkpoint (the parameters and AdamW moments, saved in
the staging folder) writes the same bytes as one that never stopped. With several processes each
takes its share of every global batch and the gradients are averaged (World.parallel).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .. import data, models
from ..compact.linear import CompactLinear
from ..errors import UserError
from ..evaluate import perplexity
from ..measure import linear_macs, matmul_rate
from ..pipeline.distributed import World
from ..progress import Reporter
from ..request import Training
from ..staging import PartialFolder, reading
from .checks import Setup

STEPS_PER_DRAW = 64  # windows for this many steps are drawn per pass over the calibration text
STATE, OPTIMIZER = "student-{:06d}.safetensors", "optimizer-{:06d}.safetensors"  # by step: progress.json names the pair


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

    def __init__(self, training: Training, tokenizer, docs: list[str]):
        self.training, self.tokenizer, self.docs, self.drawn = training, tokenizer, docs, {}

    def __call__(self, step: int) -> torch.Tensor:
        t = self.training
        draw, index = divmod(step, STEPS_PER_DRAW)
        if draw not in self.drawn:
            self.drawn = {draw: data.calibration_tokens(t.data, self.tokenizer, nsamples=STEPS_PER_DRAW * t.batch_size, seqlen=t.seqlen,
                                                        seed=t.seed * 1_000_003 + draw, docs=self.docs)}
        return self.drawn[draw][index * t.batch_size:(index + 1) * t.batch_size]


class Trainer:
    """The student in training on this process, its optimizer and masks, the teacher beside it."""

    def __init__(self, setup: Setup, training: Training, world: World, gradient_checkpointing: bool):
        self.setup, self.training, self.world, self.device = setup, training, world, world.device
        self.net = setup.student.to(self.device).train().requires_grad_(True)
        if gradient_checkpointing:
            self.net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.masks = {name: mask.to(self.device) for name, mask in frozen_zeros(self.net).items()}
        self.params = dict(self.net.named_parameters())  # tied weights appear once
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=training.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.model = world.parallel(self.net)
        self.windows = Windows(training, setup.tokenizer, setup.documents)
        self.flops_per_token = 6 * linear_macs(self.net, False) + 2 * linear_macs(setup.teacher, False)
        self.teacher_precision = _autocast(setup.teacher_device) if setup.teacher_dtype != "float32" else nullcontext()

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step on this process's share of step `step`'s windows; (KL, CE) averaged
        over the processes (CE 0 when not trained on)."""
        t = self.training
        ids = self.windows(step)[self.world.rank::self.world.size].to(self.device)
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout, where a family has it, replays on resume
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, t)
        with torch.no_grad(), self.teacher_precision:
            teacher_logits = self.setup.teacher(input_ids=ids.to(self.setup.teacher_device), use_cache=False).logits.to(self.device)
        with _autocast(self.device):
            logits = self.model(input_ids=ids, use_cache=False).logits
        loss, kl, ce = distillation_loss(logits, teacher_logits, ids, t.temperature, t.ce_weight)
        del teacher_logits, logits
        loss.backward()
        with torch.no_grad():
            for name, mask in self.masks.items():
                if self.params[name].grad is not None:
                    self.params[name].grad.masked_fill_(~mask, 0)
            torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for name, mask in self.masks.items():
                self.params[name].masked_fill_(~mask, 0)
        figures = self.world.mean(torch.stack([kl, ce if ce is not None else torch.zeros_like(kl)]).float())
        if not bool(torch.isfinite(figures).all()):
            raise UserError(f"the loss is not finite at step {step + 1}: lower --lr (now {t.lr:g}) and start over with --overwrite")
        return figures

    def perplexity(self) -> float:
        self.net.eval()
        value = perplexity(self.net, self.setup.eval_windows, device=self.device)["perplexity"]
        self.net.train()
        return value

    def save(self, run: PartialFolder, progress: dict) -> None:
        """The parameters and AdamW moments after step `progress['done']`, in files named by that
        step, then progress.json pointing at them, then the older pair removed: a kill at any point
        leaves one consistent state. Buffers are not saved: training never changes them."""
        step = progress["done"]
        run.write_tensors(STATE.format(step), self.params)
        moments = {f"{name}::{key}": value for name, p in self.params.items() for key, value in self.optimizer.state.get(p, {}).items()}
        run.write_tensors(OPTIMIZER.format(step), moments)
        run.record(progress)
        for old in [*run.path.glob("student-*.safetensors"), *run.path.glob("optimizer-*.safetensors")]:
            if old.name not in (STATE.format(step), OPTIMIZER.format(step)):
                old.unlink()

    def load(self, folder, step: int) -> None:
        """The state a run saved after step `step` (every process reads what process 0 wrote)."""
        with reading(folder / STATE.format(step)):
            weights = load_file(folder / STATE.format(step), device=str(self.device))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(weights[name])
        moments: dict[str, dict] = {}
        with reading(folder / OPTIMIZER.format(step)):
            for key, value in load_file(folder / OPTIMIZER.format(step), device=str(self.device)).items():
                name, field = key.split("::", 1)
                moments.setdefault(name, {})[field] = value
        for name, state in moments.items():
            state["step"] = state["step"].cpu()
            self.optimizer.state[self.params[name]] = state


def train(trainer: Trainer, run: PartialFolder | None, progress: dict, reporter: Reporter) -> dict:
    """Steps until the budget is spent (process 0's clock decides for every process), evaluating and
    checkpointing every `eval_steps`; returns the log and the throughput."""
    t, world = trainer.training, trainer.world
    log, step = progress["log"], progress["done"]
    rate = matmul_rate(trainer.device) if world.rank == 0 else None
    clock = time.perf_counter() - progress["seconds"]  # wall-clock of the run, over every resume

    def evaluate(kl: float | None = None) -> None:
        log.append({"step": step, "tokens": step * t.tokens_per_step, "seconds": round(time.perf_counter() - clock, 2),
                    "perplexity": trainer.perplexity(), "kl": kl})
        reporter.record("recover.evaluation", log[-1])
        if run and step:
            trainer.save(run, {"done": step, "log": log, "seconds": time.perf_counter() - clock})
            run.owned = False  # trained steps are the user's: a later failure keeps them for --resume

    def finished() -> bool:
        seconds = time.perf_counter() - clock
        return world.broadcast((t.steps is not None and step >= t.steps) or (t.max_seconds is not None and seconds >= t.max_seconds))

    if step == 0:
        world.first(evaluate)
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
            world.first(lambda: evaluate(float(figures[0])))
    seconds = time.perf_counter() - clock
    tokens_per_s = step * t.tokens_per_step / seconds
    return {"log": log, "steps": step, "tokens": step * t.tokens_per_step, "seconds": round(seconds, 1), "tokens_per_s": tokens_per_s,
            "matmul_rate": rate, "matmul_fraction": tokens_per_s * trainer.flops_per_token / rate if rate else None,
            "flops_per_token": trainer.flops_per_token, "world": world.size}


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
