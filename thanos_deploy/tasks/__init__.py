"""Task accuracy through lm-evaluation-harness, and the offline tasks this package ships.

The tasks are lm-eval task YAMLs in this folder (`FOLDER`), so `lm_eval --include_path FOLDER`
runs them as well as `thanos-deploy eval --tasks` does. Their items are built deterministically
from the evaluation novels, *Emma* and *Persuasion* (never the calibration ones), by `items`:

- `austen_cloze`: LAMBADA-style: a passage of 75 words whose next word the model must produce
  (greedy exact match, `acc`); the word ends a clause, has three letters or more, is not a stop
  word, and already occurs in the passage (as LAMBADA's words are predictable from the passage).
- `austen_next`: the true next sentence among four (`acc`, `acc_norm`): the context is one
  sentence of at most 35 words, the next one 8 to 25 words; the three distractors are the sentences
  closest to it in length among 40 drawn with a fixed seed from more than 200 sentences away in the
  same novel.

`run` hands lm-eval a model this package loaded (any artifact it reads) and returns each task's
metrics with their standard errors. lm-eval is an optional extra (`thanos-deploy[tasks]`).
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import sys
from contextlib import contextmanager, redirect_stdout
from functools import cache
from pathlib import Path

import torch

from .. import austen, hub
from ..errors import UserError

FOLDER = Path(__file__).parent
OFFLINE = ("austen_cloze", "austen_next")
ITEMS = 500
CLOZE_WORDS = 75
STOP_WORDS = set("""a about above after again against all am an and any are as at be because been before being below between both but by
can could did do does doing down during each few for from further had has have having he her here hers herself him himself his how i if in
into is it its itself just me more most my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves shall may might must upon said say says one
much many every ever never well yes sir miss mrs mr also though yet still quite rather indeed""".split())
HEADING = re.compile(r"(CHAPTER|Chapter|VOLUME)\s+[\dIVXLC]+\.?|EMMA|By Jane Austen|Persuasion|PERSUASION|by|Jane Austen|\(1818\)|Finis|FINIS")
SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])")


def chapters(book: str) -> list[list[str]]:
    """The book's chapters as lists of paragraphs (one line each, italics marks removed, headings dropped)."""
    found, current = [], []
    for block in re.split(r"\n\s*\n", book):
        paragraph = re.sub(r"\s+", " ", block.replace("_", "")).strip()
        if not paragraph:
            continue
        if HEADING.fullmatch(paragraph):
            if current:
                found.append(current)
            current = []
            continue
        current.append(paragraph)
    return found + ([current] if current else [])


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]


@cache
def items(task: str, count: int = ITEMS, seed: int = 0) -> tuple[dict, ...]:
    """The items of an offline task, the same on every machine and every call."""
    books = {name: text for name, text in austen.novels().items() if name in austen.EVALUATION}
    if task == "austen_cloze":
        return tuple(_cloze(books, count, seed))
    if task == "austen_next":
        return tuple(_next_sentence(books, count, seed))
    raise ValueError(task)


def _cloze(books: dict[str, str], count: int, seed: int) -> list[dict]:
    candidates = []
    for name in sorted(books):
        words = [w for chapter in chapters(books[name]) for paragraph in chapter for w in paragraph.split(" ")]
        for i in range(CLOZE_WORDS, len(words)):
            match = re.fullmatch(r"([A-Za-z]+)[.,;:!?][\"']?", words[i])
            if not match or len(match[1]) < 3 or match[1].lower() in STOP_WORDS:
                continue
            context = words[i - CLOZE_WORDS:i]
            context = context[next((j + 1 for j in range(30) if re.search(r"[.!?][\"']?$", context[j])), 0):]  # begin at a sentence
            passage = " ".join(context)
            if match[1] in re.findall(r"[A-Za-z]+", passage):
                candidates.append((name, i, passage, match[1]))
    order = list(range(len(candidates)))
    random.Random(seed).shuffle(order)
    taken: list[int] = []
    for k in order:  # passages that do not overlap
        name, i = candidates[k][:2]
        if all(candidates[t][0] != name or abs(candidates[t][1] - i) >= CLOZE_WORDS for t in taken):
            taken.append(k)
        if len(taken) == count:
            break
    return [{"novel": candidates[k][0], "context": candidates[k][2], "target": candidates[k][3]} for k in sorted(taken)]


def _next_sentence(books: dict[str, str], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pools = []
    for name in sorted(books):
        found = [(s, c) for c, chapter in enumerate(chapters(books[name])) for paragraph in chapter for s in sentences(paragraph)]
        words = [len(s.split()) for s, _ in found]
        usable = [i for i in range(1, len(found)) if 8 <= words[i] <= 25 and 4 <= words[i - 1] <= 35 and found[i - 1][1] == found[i][1]]
        pools.append((name, found, words, usable))
    total = sum(len(p[3]) for p in pools)
    made = []
    for n, (name, found, words, usable) in enumerate(pools):
        share = count - len(made) if n == len(pools) - 1 else round(count * len(usable) / total)
        for i in sorted(rng.sample(usable, share)):
            length = len(found[i][0])
            far = [j for j in range(len(found)) if abs(j - i) > 200 and words[j] >= 4 and found[j][0] != found[i][0]]
            drawn = rng.sample(far, min(40, len(far)))
            choices = [found[i][0]] + [found[j][0] for j in sorted(drawn, key=lambda j: (abs(len(found[j][0]) - length), j))[:3]]
            order = list(range(4))
            rng.shuffle(order)
            made.append({"novel": name, "context": found[i - 1][0], "choices": [choices[o] for o in order], "label": order.index(0)})
    return made


def check(names: list[str]) -> list[str]:
    """The task names, checked before any work: an offline one, or one of lm-eval's registry (whose
    data come from the Hugging Face hub: refused, naming the offline tasks, where it cannot be reached)."""
    if not names:
        raise UserError("--tasks names no task: give e.g. --tasks austen_cloze,austen_next")
    standard = [n for n in names if n not in OFFLINE]
    if not standard:
        return names
    _require_lm_eval()
    unknown = [n for n in standard if n not in _manager(standard=True).all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: the offline tasks are {', '.join(OFFLINE)}, and lm-eval's own have names such as "
                        "arc_easy, hellaswag or lambada_openai")
    if not hub.reachable():
        raise UserError(f"task(s) {', '.join(standard)} read their data from the Hugging Face hub, which cannot be reached from here: "
                        f"the offline tasks are {', '.join(OFFLINE)}")
    return names


def run(model: torch.nn.Module, tokenizer, names: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
        batch_size: int = 8) -> dict:
    """{task: {metric: value, metric_stderr: value}} of lm-eval's tasks on a loaded model (on its device)."""
    if tokenizer is None:
        raise UserError("task accuracy needs the model's tokenizer, and this folder has none: evaluate a folder with its tokenizer")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    standard = any(n not in OFFLINE for n in names)
    with _quiet():  # HFLM warns on stderr about being handed a loaded model: what this function is for
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit, task_manager=_manager(standard),
                                          bootstrap_iters=1000, log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    if results is None:  # under torchrun lm-eval reports on the first process only (all of them ran every request)
        return {}
    out = {}
    for task in names:
        metrics = results["results"][task]
        out[task] = {key.split(",")[0]: float(value) for key, value in metrics.items() if "," in key and isinstance(value, (int, float))}
        out[task]["samples"] = int(results.get("n-samples", {}).get(task, {}).get("effective", 0)) or None
    return out


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) of a table's accuracy columns: every accuracy-like metric of every task in rows
    that carry `tasks` (compare's and bench's)."""
    seen = {}
    for row in rows:
        for task, metrics in (row.get("tasks") or {}).items():
            for metric in metrics:
                if metric.startswith("acc") and not metric.endswith("_stderr"):
                    seen[(task, metric)] = None
    return list(seen)


def cell(row: dict, task: str, metric: str) -> str:
    """One accuracy cell: the value ± its standard error, or nothing where the row has none."""
    metrics = (row.get("tasks") or {}).get(task) or {}
    if metric not in metrics:
        return ""
    error = metrics.get(f"{metric}_stderr")
    return f"{metrics[metric]:.3f}" + (f" ± {error:.3f}" if isinstance(error, float) else "")


@contextmanager
def _quiet():
    """lm-eval's progress bars, its INFO log and the `git describe` it runs write to the standard
    error stream, and it prints a line per bootstrapped metric; the command's own output says what
    was run. Errors still come as exceptions."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(io.StringIO()):  # and the lines it prints
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("task accuracy runs lm-evaluation-harness: pip install 'thanos-deploy[tasks]'") from None


@cache
def _manager(standard: bool):
    """lm-eval's task index: this folder's tasks, with its own registry (its YAMLs, about 15,000
    names, indexed in some seconds) when `standard`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(FOLDER), include_defaults=standard)
