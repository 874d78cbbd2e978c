"""Tasks: what is trained and measured on top of a backbone.

A task turns dataset items into a prepared set, builds the trained objective over it (one
nn.Module with `batches()`, for the one trainer) and scores a set. Runs choose one by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from core.data import Dataset, Item
from core.data.media import DEFAULT_FRAMES
from core.tasks import retrieval, vqa

TASKS = ("retrieval", "vqa")


class TaskError(ValueError):
    """A dataset that cannot serve the task asked for, with a message meant for the user."""


@dataclass
class Task:
    name: str
    metric_keys: tuple[str, ...]
    prepare: Callable[[Any, list[Item]], Any]          # (backbone, items) -> prepared set
    objective: Callable[[Any, Any, float], Any]        # (backbone, set, context enhancement) -> module
    evaluate: Callable[[Any, Any], dict[str, float]]   # (backbone, set) -> metrics
    usable: Callable[[Item], bool]                     # items the task can use


def get_task(name: str, dataset: Dataset, extra_answers: tuple[str, ...] = (), frames: int = DEFAULT_FRAMES) -> Task:
    """The task `name` over `dataset`; videos are sampled at `frames` frames."""
    if name == "retrieval":
        if not any(item.captions for item in dataset.items):
            raise TaskError(f"{dataset.manifest}: retrieval needs captions, and this dataset has none")
        return Task("retrieval", retrieval.METRIC_KEYS,
                    lambda backbone, items: retrieval.prepare(backbone, dataset, items, frames),
                    retrieval.RetrievalObjective, retrieval.evaluate, lambda item: bool(item.captions))
    if name == "vqa":
        if not any(item.qa for item in dataset.items):
            raise TaskError(f"{dataset.manifest}: VQA needs rows with a question and an answer "
                            f"(data.jsonl), and this dataset has none")
        candidates = vqa.candidate_answers(dataset.items, extra_answers)
        return Task("vqa", vqa.METRIC_KEYS,
                    lambda backbone, items: vqa.prepare(backbone, dataset, items, candidates, frames),
                    lambda backbone, data, _: vqa.VqaObjective(backbone, data), vqa.evaluate,
                    lambda item: bool(item.qa))
    raise TaskError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
