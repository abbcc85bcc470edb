"""Several processes (torchrun, or `compress --nproc N` through torch's own launcher): gloo on CPU,
NCCL on CUDA with one device per process.

Per decoder layer, on N processes ("ranks"):
1. data-parallel statistics: every rank runs the dense layer on its share of the calibration
   windows (`share`), then the statistics are summed in rank order (`sum_statistics`), so every
   rank holds the same bytes and a run with the same N is deterministic;
2. weight-parallel solves: each linear goes to one rank, balanced by the cost of its solve
   (`assign`), and the new weights are broadcast from there (`share_weights`);
3. every rank runs the pruned layer on its own windows: the activations stay sharded.

Rank 0 writes the checkpoint. An error on any rank reaches every rank at the next agreement point
(`together`) and is raised there with the same message; a rank that dies makes the others' next
collective fail, and every collective has a timeout (THANOS_DEPLOY_TIMEOUT seconds, default 1800),
so no rank waits forever.

`recover` trains sharded through the same World (`shard`: PyTorch's FSDP2, `fully_shard` per decoder
layer and at the root; `save_sharded` / `load_sharded`: torch.distributed.checkpoint; `full_state`:
the whole model gathered on rank 0). This module is the one door to torch.distributed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.distributed.tensor import DTensor

from .. import loading
from ..errors import PeerLost, UserError
from ..staging import resume_command

TIMEOUT_VARIABLE = "THANOS_DEPLOY_TIMEOUT"
LAUNCHED = "THANOS_DEPLOY_LAUNCHED"  # set by `launch`: the launcher reports a lost process, the ranks do not
LOST_EXIT = 3  # the exit code of a process whose peer was lost (2 is bad input)
CHUNK_BYTES = 64 << 20  # statistics are gathered in pieces of at most this size per rank
TRANSPORT_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out", "NCCL error")


@dataclass
class World:
    """This process's place in the run; World() is a run of one process, where every exchange is a no-op."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None
    seconds: float = 0.0  # spent in exchanges, waiting for the other ranks included

    @property
    def single(self) -> bool:
        return self.size == 1

    def share(self, count: int) -> slice:
        """This rank's calibration windows: a contiguous slice, sizes differing by at most one."""
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    def assign(self, costs: dict[str, float]) -> dict[str, int]:
        """Rank of each linear: largest cost first onto the least loaded rank (ties: lowest rank)."""
        load = [0.0] * self.size
        owner = {}
        for name in sorted(costs, key=lambda n: -costs[n]):  # a stable sort: equal costs keep their order
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[name] = rank
            load[rank] += costs[name]
        return owner

    # -- exchanges ---------------------------------------------------------------------------------

    @contextmanager
    def _exchange(self):
        t0 = time.perf_counter()
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            raise PeerLost(_lost(self, e)) from None
        finally:
            self.seconds += time.perf_counter() - t0

    @contextmanager
    def sharded_work(self):
        """Around work whose collectives run inside the model (a sharded forward and backward): an
        error that says the transport to another rank broke is a lost peer, as in `_exchange`;
        any other error stays what it is."""
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            if self.single or not (isinstance(e, dist.DistError) or any(sign in str(e) for sign in TRANSPORT_FAILURES)):
                raise
            raise PeerLost(_lost(self, e)) from None

    def gather(self, value) -> list:
        """Every rank's (picklable) `value`, in rank order, on every rank."""
        if self.single:
            return [value]
        out = [None] * self.size
        with self._exchange():
            dist.all_gather_object(out, value)
        return out

    def broadcast(self, value, src: int = 0):
        """Rank `src`'s (picklable) `value` on every rank."""
        if self.single:
            return value
        box = [value]
        with self._exchange():
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def sum_(self, tensor: torch.Tensor) -> None:
        """tensor = the sum of every rank's `tensor`, added in rank order, in pieces: the same
        bytes on every rank whatever the transport's own reduction order."""
        if self.single:
            return
        flat = tensor.view(-1)
        step = max(1, CHUNK_BYTES // flat.element_size())
        with self._exchange():
            for i in range(0, flat.numel(), step):
                piece = flat[i : i + step]
                parts = [torch.empty_like(piece) for _ in range(self.size)]
                dist.all_gather(parts, piece.contiguous())
                total = parts[0]
                for part in parts[1:]:
                    total += part
                piece.copy_(total)

    def sum_statistics(self, collector) -> None:
        """Sum the statistics of every accumulator over the ranks (Hessian sums, column norms,
        token counts, the error samples concatenated in rank order)."""
        if self.single:
            return
        for name in sorted(collector.stats):
            stats = collector.stats[name]
            if stats.hessian is not None:
                self.sum_(stats.hessian)
                stats.sq_norms.copy_(stats.hessian.diagonal())
            else:
                self.sum_(stats.sq_norms)
                samples = self.gather([x.cpu() for x in stats.sample])
                stats.sample = [x.to(stats.sq_norms.device) for part in samples for x in part]
        counts = self.gather({name: stats.tokens for name, stats in collector.stats.items()})
        for name, stats in collector.stats.items():
            stats.tokens = sum(count[name] for count in counts)

    def share_weights(self, linears: dict[str, nn.Linear], owner: dict[str, int]) -> None:
        """Each linear's weight (and bias: width pruning zeroes removed units' biases) from the
        rank that pruned it, in a fixed order."""
        if self.single:
            return
        with self._exchange():
            for name, linear in linears.items():
                for tensor in (linear.weight.data, None if linear.bias is None else linear.bias.data):
                    if tensor is None:
                        continue
                    piece = tensor if tensor.is_contiguous() else tensor.contiguous()
                    dist.broadcast(piece, src=owner[name])
                    if piece is not tensor:
                        tensor.copy_(piece)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of every rank's `tensor` (figures to report, such as a loss)."""
        if self.single:
            return tensor
        with self._exchange():
            dist.all_reduce(tensor)
        return tensor / self.size

    def first(self, work):
        """`work()` on rank 0, its (picklable) result on every rank; an error there is raised on
        every rank (together) instead of leaving the others waiting in a collective."""
        result = None
        with self.together():
            if self.rank == 0:
                result = work()
        return self.broadcast(result)

    # -- sharded training (FSDP2) ----------------------------------------------------------------

    def shard(self, model: nn.Module, units, *, bf16: bool = False, offload: bool = False, reshard_root: bool = True) -> nn.Module:
        """`model` sharded over the ranks with FSDP2: each of `units` (the decoder layers) as its
        own group, the rest at the root. Parameters, gradients and optimizer states then live in
        shards of about 1/size each; a unit's parameters are gathered only while it computes, and
        gradients are averaged over the ranks. `bf16`: compute in bfloat16 on float32 masters;
        `offload`: shards held in host memory between uses. Needs a process group, even alone
        (start(..., group=True))."""
        mesh = init_device_mesh(self.device.type, (self.size,))
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        options = dict(mesh=mesh, mp_policy=precision, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
        for unit in units:
            fully_shard(unit, **options)
        return fully_shard(model, reshard_after_forward=reshard_root, **options)

    @staticmethod
    def local(tensor: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a sharded tensor (the tensor itself when it is not sharded)."""
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    @contextmanager
    def gathered(self, model: nn.Module):
        """A sharded model's root parameters whole for the block (e.g. a frozen teacher's head)."""
        model.unshard()
        try:
            yield model
        finally:
            model.reshard()

    def full_state(self, model: nn.Module) -> dict:
        """The whole state of a sharded model, on the CPU of rank 0 ({} on the others); every rank calls it."""
        with self._exchange():
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_sharded(self, model: nn.Module, optimizer, folder) -> None:
        """Each rank writes its shards of the model and optimizer states into `folder` (a checkpoint
        any number of ranks can load); complete once rank 0 has written its `.metadata`."""
        with self._exchange():
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)

    def load_sharded(self, model: nn.Module, optimizer, folder) -> None:
        """The states `save_sharded` wrote, resharded for this number of ranks."""
        with self._exchange():
            model_state, optimizer_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(state, checkpoint_id=folder)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    @contextmanager
    def together(self):
        """Around work every rank does: an error on any rank is raised on every rank after it, with
        the same message (the failing rank named), instead of leaving the others in a collective."""
        if self.single:
            yield
            return
        failure = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a bug on one rank has to stop the others too
            failure = e
        messages = self.gather(None if failure is None else str(failure) if isinstance(failure, UserError)
                               else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        for rank, message in enumerate(messages):
            if message is not None:
                raise UserError(f"process {rank} of {self.size}: {message}")


def check_same(world: World, values: dict) -> None:
    """Every process must run the same job (model, tokens, options): a difference is an error on
    every process, naming what differs, before any work."""
    if world.single:
        return
    everyone = world.gather(values)
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in everyone[0].keys() | theirs.keys() if everyone[0].get(k) != theirs.get(k))
        if differ:
            raise UserError(f"process {rank} of {world.size} was started with another {', '.join(differ)} than process 0: "
                            "start every process with the same command, on the same files")


def _lost(world: World, error: Exception) -> str:
    return (f"process {world.rank} of {world.size}: another process of this run stopped ({str(error).splitlines()[0][:120]}); "
            "every process stops. What was saved is kept: run the same command again with --resume")


def start(device_name: str = "auto", *, group: bool = False) -> World:
    """This process's World: World() alone, or its place in torchrun's job (WORLD_SIZE > 1), the
    process group started with the collectives' timeout and, on CUDA, the device LOCAL_RANK.
    `group`: a process group even alone (FSDP2 needs one; a one-rank group needs no network)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = loading.pick_device(device_name)
    if size == 1:
        if group and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    **({"device_id": device} if device.type == "cuda" else {}))
        return World(device=device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"{size} processes on this machine, but it has {torch.cuda.device_count()} CUDA devices: "
                            "start at most one process per device, or pass --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_seconds()),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(dist.get_rank(), dist.get_world_size(), device)


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE, "1800")
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise UserError(f"{TIMEOUT_VARIABLE}={text} is not a positive number of seconds: unset it, or set e.g. {TIMEOUT_VARIABLE}=3600")
    return value


def finish(world: World, *, together: bool = True) -> None:
    """Leave the process group; `together`: every process first waits for the others (process 0
    writes last). A process that left alone while the others were still at work was seen to abort
    in gloo's teardown."""
    if dist.is_initialized():
        try:
            if together:
                world.gather(None)
        finally:
            dist.destroy_process_group()


def quiet(error: UserError) -> bool:
    """Whether this process keeps an error to itself: in a run of several, every process raises
    the same one and process 0 says it; a lost process is reported by `launch` when it started the job."""
    if isinstance(error, PeerLost) and os.environ.get(LAUNCHED):
        return True
    return int(os.environ.get("RANK", "0")) != 0


def launch(nproc: int, argv: list[str], *, program: str = "thanos-deploy") -> int:
    """`program argv` in `nproc` processes through torch's elastic launcher (torchrun's engine),
    this process waiting as the agent. CPU threads are split between the processes unless
    OMP_NUM_THREADS says otherwise. Returns the exit code; a process that was killed or crashed
    is one error line here (the processes' own errors are printed by process 0)."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc starts the processes itself: drop it when running under torchrun")
    argv = _without(argv, "--nproc")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED] = "1"
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "thanos_deploy", *argv)
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        if codes.get(0, 0) > 0 and codes[0] != LOST_EXIT:
            return codes[0]  # process 0 has said why
        rank, first = min(((r, f) for r, f in e.failures.items() if f.exitcode != LOST_EXIT), key=lambda item: item[1].timestamp,
                          default=min(e.failures.items(), key=lambda item: item[1].timestamp))
        how = f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0 else f"stopped with exit code {first.exitcode}"
        print(f"error: process {rank} of {nproc} {how}; every process stopped. What was saved is kept: "
              f"resume with: {resume_command(program)}", file=sys.stderr)
        return 1
    return 0


def _without(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
