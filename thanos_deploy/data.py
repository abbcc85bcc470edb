"""Calibration and evaluation data: text sources, token windows, token files.

Sources: `austen` (offline: calibrate on Sense and Sensibility + Pride and Prejudice, evaluate on
Emma + Persuasion), `c4` and `wikitext2` (through `datasets`, online, as in the SparseGPT/Wanda/Thanos
repos), or a .txt / .jsonl file. Windows are drawn with Python's `random.Random(seed)`, so the same
inputs give the same windows every time.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import austen, hub
from .errors import UserError

HUB_SOURCES = ("c4", "wikitext2")


# ---------------------------------------------------------------------------------------------
# text


def _file_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} file '{path}' does not exist")
    raw = path.read_bytes()
    decoded = raw.decode("utf-8", errors="replace")
    if b"\x00" in raw or decoded.count("\ufffd") > 0.01 * max(len(decoded), 1):
        raise UserError(f"{what} file '{path}' is binary, not UTF-8 text: give a .txt or .jsonl text file")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(decoded.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "text" not in record:
                raise UserError(f"{what} file '{path}' line {number}: expected a JSON object with a \"text\" field")
            if not isinstance(record["text"], str):
                raise UserError(f"{what} file '{path}' line {number}: \"text\" is {json.dumps(record['text'])[:40]}, not a string: "
                                "write the text as a JSON string")
            texts.append(record["text"])
        text = "\n\n".join(texts)
    elif path.suffix in (".txt", ".md", ""):
        text = decoded
    else:
        raise UserError(f"{what} file '{path}' has an unsupported type: use a .txt or .jsonl file")
    if not text.strip():
        raise UserError(f"{what} file '{path}' is empty: give a file with text in it")
    return text


def _hub_dataset(source: str, *args, **kwargs):
    """datasets.load_dataset with a fast, clear failure when offline (and the local cache when any)."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"'{source}' is read through the 'datasets' package: pip install 'thanos-deploy[datasets]', "
            "or use austen or a .txt/.jsonl file"
        ) from None
    online = hub.reachable()
    if not online:
        datasets.config.HF_HUB_OFFLINE = True  # only a local cache can help now
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types; all mean "not available"
        reason = "no network connection to the Hugging Face hub" if not online else str(e).splitlines()[0]
        raise UserError(f"cannot load '{source}': {reason}; use --calib austen or a .txt/.jsonl file") from None


def documents(source: str, split: str) -> list[str]:
    """The documents of a source for 'calibration' or 'evaluation'."""
    if source == "austen":
        return [austen.text(split)]
    if source == "wikitext2":
        ds = _hub_dataset(source, "wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test")
        return ["\n\n".join(ds["text"])]
    if source == "c4":
        if split == "calibration":
            ds = _hub_dataset(source, "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
            return ds["text"]
        ds = _hub_dataset(source, "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
        return [" ".join(ds[:1100]["text"])]
    return [_file_text(Path(source).expanduser(), split)]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise UserError("this model folder has no tokenizer: pass token ids with --calib-tokens, or a model with a tokenizer")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# token windows


def calibration_tokens(source: str, tokenizer, *, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                       docs: list[str] | None = None) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, [nsamples, seqlen], from the documents of
    `source` (`docs` when the caller has read and checked them already).

    Like the official code: pick a random document longer than a window (c4 has many; the other
    sources are one stream), then a random offset in it.
    """
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    docs = documents(source, "calibration") if docs is None else docs
    rng = random.Random(seed)
    if len(docs) == 1:
        stream = tokenize(tokenizer, docs[0])
        if len(stream) < seqlen:
            raise UserError(
                f"calibration text '{source}' has {len(stream)} tokens, shorter than one window of {seqlen}: "
                "give more text or a smaller --seqlen"
            )
        starts = [rng.randint(0, len(stream) - seqlen) for _ in range(nsamples)]
        return torch.stack([stream[s : s + seqlen] for s in starts])
    windows = []
    for _ in range(nsamples):
        for _attempt in range(10_000):
            ids = tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if len(ids) > seqlen:
                break
        else:
            raise UserError(f"no document of '{source}' is longer than {seqlen} tokens: use a smaller --seqlen")
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def evaluation_tokens(source: str, tokenizer) -> torch.Tensor:
    """The evaluation split of a source as one token stream."""
    return tokenize(tokenizer, "\n\n".join(documents(source, "evaluation")))


def batch_size(seqlen: int, batch_tokens: int) -> int:
    """Windows of `seqlen` tokens per batch of about `batch_tokens` tokens (at least one)."""
    return max(1, batch_tokens // seqlen)


def windows(stream: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] cut from the start of a token stream."""
    n = len(stream) // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the evaluation text has {len(stream)} tokens, shorter than one window of {seqlen}: use a smaller --seqlen")
    return stream[: n * seqlen].view(n, seqlen)


def load_token_file(path: str | Path) -> torch.Tensor:
    """Exact calibration tokens [n, seqlen] from .pt (weights_only), .npy or .safetensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"token file '{path}' does not exist")
    try:
        if path.suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            obj = load_file(path)
        else:
            raise UserError(f"token file '{path}': use .pt, .npy or .safetensors")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read token file '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, dict):
        obj = obj.get("input_ids", next(iter(obj.values())) if len(obj) == 1 else None)
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or obj.numel() == 0:
        raise UserError(f"token file '{path}' must hold one non-empty 2-D tensor [n, seqlen] (or an 'input_ids' entry)")
    if obj.dtype.is_floating_point or obj.dtype == torch.bool or obj.is_complex():
        raise UserError(f"token file '{path}' holds {obj.dtype} values: token ids must be integers")
    return obj.long()


def check_tokens(ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise UserError(f"token ids must lie in [0, {vocab_size}) for this model, found [{lo}, {hi}]")


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of the token tensor (int64, little-endian, row-major) with its shape."""
    data = ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return "sha256:" + hashlib.sha256(f"{tuple(ids.shape)}".encode() + data).hexdigest()
