"""The staging folder of a resumable run: `.OUT.partial/` next to `--out`. It is only staging: the
run keeps its progress there, and artifact.publish puts it in place of `--out` in one rename when
the run completes. `compress` keeps its finished layers there (pipeline/resume.py), `recover` its
training state.

- `progress.json`: how far the run got (replaced atomically last, so a kill at any point leaves the
  previous consistent state);
- `fingerprint.json`: everything that decides the result; a resume that differs is refused;
- `lock`: an exclusive `flock` held while a process works here (the kernel drops it on SIGKILL).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .artifact import publish
from .errors import PeerLost, UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file size limit (ulimit -f)
PROGRESS, FINGERPRINT, LOCK = "progress.json", "fingerprint.json", "lock"

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


class PartialFolder:
    """Open (and lock) the staging folder of `out`. Raises UserError if another process holds it,
    or if an unfinished run is there and neither --resume nor --overwrite says what to do with it.
    `unit` names what `done` counts (layers, steps) for the resume hint."""

    def __init__(self, out: Path, *, resume: bool, overwrite: bool, unit: str, fresh: dict):
        self.out, self.path, self.unit = out, partial_folder(out), unit
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
        self.fresh = fresh
        self.progress = self.read_json(PROGRESS) or dict(fresh)

    @property
    def done(self) -> int:
        return self.progress["done"]

    def read_json(self, name: str) -> dict | None:
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

    def record(self, progress: dict) -> None:
        """The run got this far: written last after each checkpoint."""
        self.write_json(PROGRESS, progress)
        self.progress = progress

    def check_fingerprint(self, fingerprint: dict) -> None:
        """Record the fingerprint; on resume, refuse progress made with a different one."""
        old = self.read_json(FINGERPRINT)
        if old is not None and self.done > 0 and old != fingerprint:
            changed = [f"{k} (was {_short(old.get(k))}, now {_short(fingerprint.get(k))})" for k in sorted(old.keys() | fingerprint.keys()) if old.get(k) != fingerprint.get(k)]
            raise UserError(f"--resume: the unfinished run in '{self.path}' differs: {'; '.join(changed)}; rerun with its options, or use --overwrite to start over")
        if old != fingerprint:
            self.progress = dict(self.fresh)
            self.write_json(FINGERPRINT, fingerprint)

    def write_tensors(self, name: str, tensors: dict, *, dtype: torch.dtype | None = None) -> None:
        """A safetensors file here, synced and renamed into place (floating tensors cast to `dtype`
        when given); a full disk is an OSError with its errno, as any other write."""
        def ready(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
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

    def publish(self, *, overwrite: bool) -> Path:
        """The run is complete and the folder holds the artifact: progress files go, it becomes `out`."""
        for name in (PROGRESS, FINGERPRINT, LOCK):
            (self.path / name).unlink(missing_ok=True)
        publish(self.path, self.out, overwrite=overwrite)
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


@contextmanager
def reading(path: Path):
    """A progress file that cannot be read is one line that says to start over."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise UserError(f"'{path}' cannot be read ({e}): rerun with --overwrite instead of --resume") from None


def resume_command(program: str = "thanos-deploy") -> str:
    """This very command line, with --resume."""
    args = sys.argv[1:]
    return shlex.join([program, *args] + ([] if "--resume" in args else ["--resume"]))


@contextmanager
def guard(run: PartialFolder | None):
    """Around a run: an error discards a run this process started (a resumed run's progress is the
    user's and stays); Ctrl-C keeps what is done and prints the command that continues, and so
    does a full disk; a kill keeps it too (the kernel drops the lock)."""
    if run is None:
        yield None
        return
    try:
        yield run
    except PeerLost:  # another process of a distributed run stopped: what is done is kept, as after a kill
        run.close(discard=run.done == 0 and run.owned)
        raise
    except KeyboardInterrupt:
        keep = run.done > 0 or not run.owned
        run.close(discard=not keep)
        if keep:
            print(f"interrupted after {run.done} {run.unit}, saved in '{run.path}'; resume with:\n  {resume_command()}", file=sys.stderr)
        raise
    except OSError as e:
        if e.errno not in NO_SPACE:
            run.close(discard=run.owned)
            raise
        keep = run.done > 0 or not run.owned
        run.close(discard=not keep)
        fix = f"free some space, then resume with: {resume_command()}" if keep else "free some space or choose another --out"
        raise UserError(f"no space left on the device writing '{run.out}' ({e.strerror}): {fix}") from None
    except BaseException:
        run.close(discard=run.owned)
        raise


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
