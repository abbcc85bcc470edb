"""`recover`: distil the dense teacher into a pruned student, keeping every pruned weight pruned.

The student is any artifact `compress` writes (masked, packed, shrunk or plain) and comes back in
the same storage: N:M stays N:M (checked again when packed), outlier rows stay dense, shrunk and
plain models keep their shapes. Three parts: checks.py loads and checks the student, teacher and
data; trainer.py trains (one process's share of every step); writing.py writes the result.

Runs are reproducible and resumable: the state is checkpointed in the staging folder every
evaluation (staging.py), and a run resumed after a kill writes the same bytes as one that never
stopped. Under torchrun every process takes its share of each global batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from ..artifact import check_output, versions
from ..errors import UserError
from ..pipeline import distributed, resume
from ..progress import SILENT, Reporter
from ..request import RecoverRequest
from ..staging import PartialFolder, guard, partial_folder
from . import checks
from .trainer import Trainer, distillation_loss, learning_rate, train  # noqa: F401  (the API of recover)
from .writing import write


def recover(request: RecoverRequest, reporter: Reporter = SILENT) -> dict:
    """Distil the teacher into `request.student` and write the result to `request.output.out` in the
    student's storage; returns the run's log and summary (on process 0; the others return theirs
    without writing)."""
    started = time.perf_counter()
    world = distributed.start(request.device)  # one process, or one of torchrun's (gloo on CPU, NCCL on CUDA)
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
    out = check_output(request.output.out, request.output.overwrite)
    from_artifact = checks.load(request, world.device, reporter)
    fingerprint = _fingerprint(request, from_artifact, world)
    with world.together():
        run = _open(request, fingerprint) if world.rank == 0 else None
    progress = world.broadcast(run.progress if run else None)
    with guard(run):
        trainer = Trainer(from_artifact, request.training, world, request.memory.gradient_checkpointing)
        if progress["done"]:
            trainer.load(partial_folder(out), progress["done"])
        result = train(trainer, run, progress, reporter)
        if request.memory.gradient_checkpointing:
            trainer.net.activation_checkpointing_disable()

        def finish() -> None:
            with reporter.status(f"saving to {out}"):
                write(trainer, request, result)
            run.close(discard=True)

        world.first(finish)
    return result


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


def _fingerprint(request: RecoverRequest, setup: checks.Setup, world: distributed.World) -> dict:
    """Everything that decides the recovered weights: a resumed run must match it."""
    student = request.student
    return {"student": str(Path(student).expanduser().resolve()), **resume.model_identity(Path(student).expanduser()),
            "student_files": setup.manifest.files, "teacher": setup.teacher_name, "teacher_dtype": setup.teacher_dtype,
            "teacher_device": setup.teacher_device.type, **asdict(request.training), **asdict(request.evaluation), "world": world.size,
            "device": world.device.type, "versions": versions()}
