"""Resumable, exclusive `compress` runs: the temporary output folder is also the progress record.

`.OUT.partial/` next to `--out` holds, after decoder layer i is pruned:
- `model-layer-0000i.safetensors`: the pruned layer, already in its final form (a shard of the output);
- `inputs-0000{i+1}.safetensors`: what reaches layer i+1 (the hidden states, per calibration batch;
  the other layer arguments, masks and positions, are recomputed from the embeddings, which is cheap).
  With activations on disk it is where the driver writes that layer's outputs as they come and
  reads them back from, batch by batch (activations.py);
- `progress.json`: layers done and their reports, replaced atomically last, so a kill at any point
  leaves the previous consistent state;
- `fingerprint.json`: everything that determines the result; a resume that differs is refused;
- `lock`: an exclusive `flock` held while a process works here (the kernel drops it on SIGKILL).

On success the non-layer tensors, config, tokenizer and manifest are added, the index file last, the
progress files removed, and the folder renamed to `--out` in one step.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .. import models
from ..checkpoint import INDEX, MANIFEST, legacy_rope_keys, sha256
from ..errors import PeerLost, UserError
from . import activations
from .offload import free_layer

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file size limit (ulimit -f)
PROGRESS, FINGERPRINT, LOCK = "progress.json", "fingerprint.json", "lock"
REST = "model-rest.safetensors"


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def layer_file(index: int) -> str:
    return f"model-layer-{index:05d}.safetensors"


def inputs_file(index: int, rank: int | None = None) -> str:
    """The hidden states reaching layer `index`; in a run of several processes, those of one process's windows."""
    return f"inputs-{index:05d}.safetensors" if rank is None else f"inputs-{index:05d}.rank{rank}.safetensors"


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def model_identity(where) -> dict:
    """What identifies a model folder cheaply: its config's hash and its weight files' names and sizes."""
    if isinstance(where, str):
        return {"hub_id": where}
    folder = Path(where)
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return {"config_sha256": config, "weights": {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}}


class LayerStore:
    """What every process of a run does with the partial folder `path`: read offloaded layers
    (`weights`), keep its activations between layers there (`activations_on_disk`), read finished
    layers back. A run of several processes keeps one activations file per process (`rank`) and
    no other process's; process 0's RunFolder writes everything else."""

    path: Path
    model: nn.Module | None = None
    weights = None
    activations_on_disk: bool = False
    rank: int | None = None  # None: the only process

    @property
    def bounds_memory(self) -> bool:
        """Layers offloaded or activations on disk: a run whose point is to stay small."""
        return self.weights is not None or self.activations_on_disk

    def spill(self, index: int) -> Path | None:
        """Where the driver keeps the hidden states that reach layer `index`: None (memory), or a file
        here (for a single process, the file this folder checkpoints them in anyway)."""
        return self.path / inputs_file(index, self.rank) if self.activations_on_disk else None

    def load(self, index: int, layer: nn.Module) -> None:
        if self.weights is not None:
            self.weights.load_into(layer, self._prefix(index), next(self.model.parameters()).dtype)

    def load_finished(self, index: int, layer: nn.Module) -> None:
        """Layer `index` as a finished run saved it (into an offloaded layer's meta tensors too)."""
        path, prefix = self.path / layer_file(index), self._prefix(index)
        with reading(path), safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        own = layer.state_dict()
        layer.load_state_dict({k.removeprefix(prefix): v.to(own[k.removeprefix(prefix)].dtype) for k, v in tensors.items()}, assign=True)

    def forget(self, index: int, layer: nn.Module) -> None:
        """Done with layer `index`: offloaded layers live on disk only."""
        if self.weights is not None:
            free_layer(layer)

    def _prefix(self, index: int) -> str:
        return models.layer_prefix(self.model, index) + "."


class Follower(LayerStore):
    """The run folder as a process other than 0 of a distributed run sees it (LayerStore)."""

    def __init__(self, path: Path, rank: int, model: nn.Module, *, weights=None, activations_on_disk: bool = False):
        self.path, self.rank, self.model, self.weights, self.activations_on_disk = path, rank, model, weights, activations_on_disk

    def save(self, index: int, layer: nn.Module, report: dict, inputs) -> None:
        if self.activations_on_disk:
            self.spill(index).unlink(missing_ok=True)
        self.forget(index, layer)


class RunFolder(LayerStore):
    """Open (and lock) the partial folder of `out`. Raises UserError if another process holds it,
    or if an unfinished run is there and neither --resume nor --overwrite says what to do with it."""

    def __init__(self, out: Path, *, resume: bool, overwrite: bool):
        self.out, self.path = out, partial_folder(out)
        self._made = [p for p in out.parents if not p.exists()]  # removed again if this run is discarded
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.mkdir()
            existed = False
        except FileExistsError:
            existed = True
        self._lock = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            pid = self._lock.read().strip() or "?"
            self._lock.close()
            raise UserError(f"another thanos-deploy process (pid {pid}) is writing '{out}': wait for it to finish or choose another --out") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        if existed and not resume and not overwrite:
            self.close(discard=False)
            raise UserError(f"'{out}' has an unfinished run in '{self.path}': add --resume to continue it, or --overwrite to start over")
        if existed and not resume:
            for p in self.path.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.owned = not (existed and resume)  # a resumed run's progress is the user's: never discard it on bad input
        self.progress = self._read(PROGRESS) or {"done": 0, "reports": []}
        self.model = self.weights = self.write_dtype = None
        self.activations_on_disk = False
        self.unit = "layers"  # what `done` counts, for the resume hint

    @property
    def done(self) -> int:
        return self.progress["done"]

    def _read(self, name: str) -> dict | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"'{path}' is damaged: rerun with --overwrite instead of --resume") from None

    def write_json(self, name: str, value: dict) -> None:
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "w") as f:
            json.dump(value, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        _sync_folder(self.path)

    def start(self, fingerprint: dict, model: nn.Module, *, weights=None, write_dtype=None, activations_on_disk: bool = False,
              processes: int = 1) -> None:
        """Record (or, on resume, check) the fingerprint; `weights` is set for offloaded layers.
        Where the activations live is not in the fingerprint: the results are the same bytes. Nor is
        the number of processes: a resumed run may use another (the driver then recomputes the
        hidden states from the finished layers, and keeps none here)."""
        self.check_fingerprint(fingerprint)
        self.model, self.weights, self.write_dtype = model, weights, write_dtype
        self.activations_on_disk = activations_on_disk
        self.rank = 0 if processes > 1 else None

    def check_fingerprint(self, fingerprint: dict) -> None:
        """Record the fingerprint; on resume, refuse progress made with a different one."""
        old = self._read(FINGERPRINT)
        if old is not None and self.done > 0 and old != fingerprint:
            changed = [f"{k} (was {_short(old.get(k))}, now {_short(fingerprint.get(k))})" for k in sorted(old.keys() | fingerprint.keys()) if old.get(k) != fingerprint.get(k)]
            raise UserError(f"--resume: the unfinished run in '{self.path}' differs: {'; '.join(changed)}; rerun with its options, or use --overwrite to start over")
        if old != fingerprint:
            self.progress = {"done": 0, "reports": []}
            self.write_json(FINGERPRINT, fingerprint)

    # -- what driver.compress_model calls -------------------------------------------------------

    @property
    def kept_hidden(self) -> bool:
        """Whether the hidden states reaching the next layer are here (a run of one process keeps them)."""
        return self.done == 0 or (self.path / inputs_file(self.done)).is_file()

    def restore(self, layers: nn.ModuleList, inputs):
        """(first layer to prune, reports so far, its inputs): the finished layers are put back in
        memory unless offloaded, and the saved hidden states replace the freshly captured ones
        (read into memory, or read batch by batch from their file with activations on disk)."""
        k = self.done
        if k == 0:
            return 0, [], inputs
        if self.weights is None:
            for i in range(k):
                self.load_finished(i, layers[i])
        on_disk, path = isinstance(inputs.hidden, activations.OnDisk), self.path / inputs_file(k)
        with reading(path):
            saved = activations.OnDisk(path, inputs.hidden.device if on_disk else inputs.hidden[0].device)
            if saved.shapes != activations.shapes(inputs.hidden):
                raise UserError(f"'{path}' does not match this run's calibration batches: rerun with --overwrite")
            hidden = saved if on_disk else list(saved)
        if on_disk:
            inputs.hidden.path.unlink()  # the captured inputs of layer 0, not needed
        inputs.hidden = hidden
        return k, list(self.progress["reports"]), inputs

    def save(self, index: int, layer: nn.Module, report: dict, inputs) -> None:
        """Checkpoint after layer `index`: its shard, the next layer's inputs (unless the driver
        wrote them there already, activations on disk; a run of several processes keeps none),
        then the progress."""
        prefix = self._prefix(index)
        self.write_tensors(layer_file(index), {prefix + k: v for k, v in layer.state_dict().items()}, cast=True)
        if self.rank is None and not isinstance(inputs.hidden, activations.OnDisk):
            self.write_tensors(inputs_file(index + 1), {f"batch.{j}": h for j, h in enumerate(inputs.hidden)}, cast=False)
        progress = {"done": index + 1, "reports": self.progress["reports"] + [report]}
        self.write_json(PROGRESS, progress)
        self.progress = progress
        (self.path / inputs_file(index, self.rank)).unlink(missing_ok=True)
        self.forget(index, layer)

    # -- the end ----------------------------------------------------------------------------------

    def finish(self, tokenizer, manifest: dict, *, overwrite: bool) -> Path:
        """Write the rest of a masked checkpoint, the manifest, the index last; rename to `out`."""
        model = self.model
        layers = models.decoder_layers(model)
        prefixes = tuple(self._prefix(i) for i in range(len(layers)))
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
        head = model.get_output_embeddings()
        if getattr(model.config, "tie_word_embeddings", False) and head is not None:
            head_name = next(n for n, m in model.named_modules() if m is head)
            rest.pop(f"{head_name}.weight", None)  # tied to the input embeddings, re-tied on load
        self.write_tensors(REST, rest, cast=True)
        dtype = self.write_dtype or next(iter(rest.values())).dtype
        model.config.dtype = dtype
        model.config.save_pretrained(self.path)
        legacy_rope_keys(self.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.path)
        for p in list(self.path.glob("inputs-*.safetensors")) + [self.path / PROGRESS, self.path / FINGERPRINT]:
            p.unlink(missing_ok=True)
        shards = [layer_file(i) for i in range(len(layers))] + [REST]
        weight_map, total = {}, 0
        for name in shards:
            with safe_open(self.path / name, "pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    sl = f.get_slice(key)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        files = {name: sha256(self.path / name) for name in sorted(shards)}
        (self.path / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")
        self.write_json(INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        (self.path / LOCK).unlink()
        if self.out.exists():
            if not overwrite:
                raise UserError(f"output '{self.out}' appeared while compressing: pass --overwrite or choose another --out")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "x")
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        self._lock.close()
        return self.out

    def close(self, *, discard: bool) -> None:
        """Release the lock; `discard` removes the folder (a run that failed on bad input)."""
        if discard:
            shutil.rmtree(self.path, ignore_errors=True)
            for folder in self._made:  # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    break
        if not self._lock.closed:
            self._lock.close()

    # -- tensors ----------------------------------------------------------------------------------

    def write_tensors(self, name: str, tensors: dict, *, cast: bool) -> None:
        def ready(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu")
            if cast and self.write_dtype is not None and t.is_floating_point():
                t = t.to(self.write_dtype)
            return t.contiguous()

        tmp = self.path / f".{name}.tmp"
        try:
            save_file({k: ready(v) for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        except SafetensorError as e:  # the Rust writer reports I/O errors (a full disk) as its own type
            tmp.unlink(missing_ok=True)
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code.group(1)) if code else errno.EIO, str(e).splitlines()[0], str(tmp)) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # the safetensors writer creates files 0600
        os.replace(tmp, self.path / name)


@contextmanager
def reading(path: Path):
    """A progress file that cannot be read is one line that says to start over."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise UserError(f"'{path}' cannot be read ({e}): rerun with --overwrite instead of --resume") from None


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(dtype, 1)


def resume_command(program: str) -> str:
    """This very command line, with --resume."""
    args = sys.argv[1:]
    return shlex.join([program, *args] + ([] if "--resume" in args else ["--resume"]))


@contextmanager
def guard(run: RunFolder, program: str):
    """Around a run: an error discards a run this process started (a resumed run's progress is the
    user's and stays); Ctrl-C keeps the finished layers and prints the command that continues, and
    so does a full disk; a kill keeps them too (the kernel drops the lock)."""
    try:
        yield run
    except PeerLost:  # another process of a distributed run stopped: its finished layers are kept, as after a kill
        run.close(discard=run.done == 0 and run.owned)
        raise
    except KeyboardInterrupt:
        keep = run.done > 0 or not run.owned
        run.close(discard=not keep)
        if keep:
            print(f"interrupted after {run.done} {run.unit}, saved in '{run.path}'; resume with:\n  {resume_command(program)}", file=sys.stderr)
        raise
    except OSError as e:
        if e.errno not in NO_SPACE:
            run.close(discard=run.owned)
            raise
        keep = run.done > 0 or not run.owned
        run.close(discard=not keep)
        fix = f"free some space, then resume with: {resume_command(program)}" if keep else "free some space or choose another --out"
        raise UserError(f"no space left on the device writing '{run.out}' ({e.strerror}): {fix}") from None
    except BaseException:
        run.close(discard=run.owned)
        raise
