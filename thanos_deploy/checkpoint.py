"""Writing outputs atomically, and saving/loading pruned checkpoints.

A checkpoint is a plain Hugging Face folder (config, safetensors, tokenizer) plus
`thanos_deploy.json`, the manifest: what was done, with what, and how well.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

MANIFEST = "thanos_deploy.json"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, if `out` exists and may not be replaced."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists: pass --overwrite or choose another --out")
    if not out.parent.is_dir():
        raise UserError(f"cannot write '{out}': folder '{out.parent}' does not exist")
    return out


@contextmanager
def staged(out: str | Path, overwrite: bool = False, *, is_dir: bool = True):
    """Yield a temporary path next to `out`; on success it replaces `out` in one rename.

    On any error the temporary path is removed and `out` is left as it was.
    """
    out = check_output(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    target = tmp if is_dir else tmp / out.name
    try:
        yield target
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(target, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(model, tokenizer, out: str | Path, manifest: dict, *, overwrite: bool = False) -> Path:
    """Save a pruned model as a Hugging Face folder with its manifest, atomically."""
    with staged(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out)


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{path}' is not valid JSON ({e}): the checkpoint is damaged, re-create it") from None


def load_pretrained(where, *, dtype="auto"):
    """Load a causal LM from a folder or hub id."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{where}': {msg}") from None
