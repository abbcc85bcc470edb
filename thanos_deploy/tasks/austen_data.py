"""The datasets of the offline tasks, built when lm-eval loads them (`custom_dataset: !function
austen_data.cloze` in the task YAMLs next to this file): deterministic, nothing downloaded."""

from __future__ import annotations

from thanos_deploy.tasks import items


def cloze(**_options):
    return _dataset("austen_cloze")


def next_sentence(**_options):
    return _dataset("austen_next")


def _dataset(task: str):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list([dict(item) for item in items(task)])})
