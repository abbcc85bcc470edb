"""`recover`: distil the dense teacher into a pruned student, keeping every pruned weight pruned.

The student is any artifact `compress` writes (masked, packed, shrunk or plain) and comes back in
the same storage: N:M stays N:M (checked again when packed), outlier rows stay dense, shrunk and
plain models keep their shapes. Four parts: checks.py loads and checks the student, teacher and
data; trainer.py trains, the student sharded over 1…N processes with FSDP2; loss.py the chunked
distillation loss; writing.py writes the result, gathered on process 0.

Runs are reproducible and resumable: the sharded state is checkpointed in the staging folder every
evaluation (staging.py, torch.distributed.checkpoint), and a run resumed after a kill writes the
same bytes as one that never stopped (on another number of processes it continues, to rounding).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import loading, tasks
from ..artifact import Manifest, check_output, versions
from ..errors import UserError
from ..pipeline import activations, distributed, resume
from ..progress import SILENT, Reporter
from ..request import Memory, RecoverRequest, Teacher, Training
from ..staging import PartialFolder, guard, partial_folder
from . import checks
from . import plan as memory
from .trainer import Trainer, learning_rate, train  # noqa: F401  (the API of recover)
from .writing import write


def recover(request: RecoverRequest, reporter: Reporter = SILENT) -> dict:
    """Distil the teacher into `request.student` and write the result to `request.output.out` in the
    student's storage; returns the run's log and summary (on process 0; the others return theirs
    without writing)."""
    started = time.perf_counter()
    world = distributed.start(request.device, group=True)  # one process, or one of torchrun's (gloo on CPU, NCCL on CUDA)
    try:
        result = _recover(request, world, reporter if world.rank == 0 else SILENT)
    except BaseException:
        distributed.finish(world, together=False)
        raise
    distributed.finish(world)
    return {**result, "seconds_total": round(time.perf_counter() - started, 1)}


def _recover(request: RecoverRequest, world: distributed.World, reporter: Reporter) -> dict:
    if request.training.batch_size % world.size:
        raise UserError(f"--batch-size {request.training.batch_size} does not split over {world.size} processes: use a multiple of {world.size}")
    if request.memory.cpu_offload and world.device.type != "cuda":
        raise UserError("--cpu-offload keeps the shards in host memory between uses on a GPU; this run is on the CPU already: drop it")
    if request.tasks:
        tasks.check(list(request.tasks.names))
    out = check_output(request.output.out, request.output.overwrite)
    activations.free_large_blocks_at_once()  # freed activations go back to the system: the peak is what is alive
    setup = checks.load(request, world.device, reporter)
    made = memory.check(memory.shape_of(setup.student), memory.shape_of(setup.teacher), _setting(request, setup, world),
                        memory.capacity(world.device, world.size))
    reporter.record("recover.plan", made.as_dict())
    fingerprint = _fingerprint(request, setup)
    with world.together():
        run = _open(request, fingerprint) if world.rank == 0 else None
    progress = world.broadcast(run.progress if run else None)
    with guard(run):
        trainer = Trainer(setup, request.training, world, gradient_checkpointing=request.memory.gradient_checkpointing,
                          cpu_offload=request.memory.cpu_offload)
        if progress["done"]:
            trainer.load(partial_folder(out), progress["done"])
        with world.sharded_work():
            result = {**train(trainer, run, partial_folder(out), progress, reporter, request.tasks), "plan": made.as_dict()}
            trained = trainer.full_student()

        def finish() -> None:
            with reporter.status(f"saving to {out}"):
                write(trained, setup, request, result)
            run.close(discard=True)

        world.first(finish)
    return result


def plan_only(student: str, teacher: Teacher, training: Training, memory_options: Memory, *, processes: int = 1,
              device_memory: float | None = None) -> memory.Plan:
    """The memory plan of a run, from the configs alone (nothing loaded, nothing started): for the
    GPUs `device_memory` describes (bytes each), else for this machine."""
    manifest = Manifest.read(student) if Path(student).is_dir() else None
    source = teacher.model or (manifest.source_model if manifest else None)
    student_shape = memory.shape_from_config(student)
    teacher_shape = memory.shape_from_config(source) if source else student_shape
    device = "cuda" if device_memory else loading.pick_device("auto").type
    t_bytes = 2 if (teacher.dtype == "auto" and device == "cuda") or teacher.dtype in ("bfloat16", "float16") else 4
    setting = memory.Setting(processes, device, training.batch_size, training.seqlen, memory_options.gradient_checkpointing,
                             memory_options.cpu_offload, t_bytes, teacher_apart=teacher.device is not None and teacher.device != device)
    return memory.planned(student_shape, teacher_shape, setting, device_memory or memory.capacity(loading.pick_device("auto"), processes))


def _setting(request: RecoverRequest, setup: checks.Setup, world: distributed.World) -> memory.Setting:
    return memory.Setting(world.size, world.device.type, request.training.batch_size, request.training.seqlen,
                          request.memory.gradient_checkpointing, request.memory.cpu_offload,
                          torch.finfo(next(setup.teacher.parameters()).dtype).bits // 8, setup.teacher_device != world.device, setup.chunked)


def _open(request: RecoverRequest, fingerprint: dict) -> PartialFolder:
    """Process 0's staging folder: the lock, the fingerprint, the progress of a resumed run."""
    run = PartialFolder(request.output.out, resume=request.output.resume, overwrite=request.output.overwrite, unit="steps",
                        fresh={"done": 0, "log": [], "seconds": 0.0})
    try:
        run.check_fingerprint(fingerprint)
    except UserError:
        run.close(discard=run.owned)
        raise
    return run


def _fingerprint(request: RecoverRequest, setup: checks.Setup) -> dict:
    """Everything that decides the recovered weights: a resumed run must match it (the number of
    processes may differ: the sharded checkpoint is resharded)."""
    student = request.student
    return {"student": str(Path(student).expanduser().resolve()), **resume.model_identity(Path(student).expanduser()),
            "student_files": setup.manifest.files, "teacher": setup.teacher_name, "teacher_dtype": setup.teacher_dtype,
            "teacher_device": setup.teacher_device.type, **asdict(request.training), **asdict(request.evaluation),
            "device": loading.pick_device(request.device).type, "versions": versions()}
