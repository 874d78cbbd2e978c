"""Tasks: what is trained and measured on top of a backbone.

Each task describes itself once in a `TaskKind` registered with `register_task`: its metrics
(keys and how people read them), the one a run is summarised by, which are better lower, and
how it is built over a dataset. Built, a `Task` turns dataset items into a prepared set, builds
the trained objective over it (one nn.Module with `batches()`, for the one trainer) and scores
a set. Runs choose one by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from core.data import Dataset, Item
from core.data.media import DEFAULT_FRAMES
from core.tasks import retrieval, vqa


class TaskError(ValueError):
    """A dataset that cannot serve the task asked for, with a message meant for the user."""


@dataclass
class Task:
    name: str
    metric_keys: tuple[str, ...]
    prepare: Callable[[Any, list[Item]], Any]          # (backbone, items) -> prepared set
    objective: Callable[[Any, Any, Any], Any]          # (backbone, set, PET handle) -> module
    evaluate: Callable[..., dict[str, float]]          # (backbone, set, EncodedMedia or None) -> metrics
    usable: Callable[[Item], bool]                     # items the task can use


@dataclass(frozen=True)
class TaskKind:
    """A task as the CLI, the app and the figures see it, before any dataset. `build(dataset,
    extra answers, frames)` makes its Task over a dataset, or raises TaskError when the dataset
    cannot serve it."""

    name: str
    metrics: dict[str, str]                          # key -> how people read it, in the order scored
    headline: str                                    # the metric a run is summarised by
    build: Callable[[Dataset, tuple[str, ...], int], Task]
    lower_is_better: frozenset[str] = frozenset()    # metrics where smaller is better (median ranks)


TASKS: dict[str, TaskKind] = {}


def register_task(kind: TaskKind) -> TaskKind:
    """Make `kind` known to runs, the CLI, checkpoints and the app; names are unique."""
    if kind.name in TASKS:
        raise ValueError(f"a task named {kind.name} is already registered")
    if kind.headline not in kind.metrics:
        raise ValueError(f"task {kind.name}: its headline metric {kind.headline} is not one of its metrics")
    TASKS[kind.name] = kind
    return kind


def _kind(name: str) -> TaskKind:
    if name not in TASKS:
        raise TaskError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
    return TASKS[name]


def get_task(name: str, dataset: Dataset, extra_answers: tuple[str, ...] = (), frames: int = DEFAULT_FRAMES) -> Task:
    """The task `name` over `dataset`; videos are sampled at `frames` frames."""
    return _kind(name).build(dataset, extra_answers, frames)


def headline_metric(task_name: str) -> str:
    """The one metric a run of the task is summarised by (its key)."""
    return _kind(task_name).headline


def check_metrics(task_name: str, metrics: dict[str, float]) -> None:
    """Refuse (TaskError) a key that is not one of the task's metrics, or a value no score takes:
    a median rank below 1, any other metric (a percentage) outside 0 to 100."""
    kind = _kind(task_name)
    for key, value in metrics.items():
        if key not in kind.metrics:
            raise TaskError(f"'{key[:40]}' is not a metric of the {task_name} task")
        if key in kind.lower_is_better:
            if not value >= 1:
                raise TaskError(f"'{key}' is a rank: it must be at least 1, not {value:g}")
        elif not 0 <= value <= 100:
            raise TaskError(f"'{key}' is a percentage: it must be from 0 to 100, not {value:g}")


def metric_label(key: str) -> str:
    """How people read a metric key ("t2i_r1" -> "text→image R@1"); an unknown key as it is."""
    return next((kind.metrics[key] for kind in TASKS.values() if key in kind.metrics), key)


def lower_is_better(key: str) -> bool:
    """Whether a smaller value of the metric is better (median ranks)."""
    return any(key in kind.lower_is_better for kind in TASKS.values())


def _retrieval_task(dataset: Dataset, extra_answers: tuple[str, ...], frames: int) -> Task:
    if not any(item.captions for item in dataset.items):
        raise TaskError(f"{dataset.manifest}: retrieval needs captions, and this dataset has none")
    return Task("retrieval", retrieval.METRIC_KEYS,
                lambda backbone, items: retrieval.prepare(backbone, dataset, items, frames),
                retrieval.RetrievalObjective, retrieval.evaluate, lambda item: bool(item.captions))


def _vqa_task(dataset: Dataset, extra_answers: tuple[str, ...], frames: int) -> Task:
    if not any(item.qa for item in dataset.items):
        raise TaskError(f"{dataset.manifest}: VQA needs rows with a question and an answer "
                        f"(data.jsonl), and this dataset has none")
    candidates = vqa.candidate_answers(dataset.items, extra_answers)
    return Task("vqa", vqa.METRIC_KEYS,
                lambda backbone, items: vqa.prepare(backbone, dataset, items, candidates, frames),
                lambda backbone, data, _: vqa.VqaObjective(backbone, data), vqa.evaluate,
                lambda item: bool(item.qa))


register_task(TaskKind("retrieval", retrieval.METRICS, "t2i_r1", _retrieval_task, retrieval.LOWER_IS_BETTER))
register_task(TaskKind("vqa", vqa.METRICS, "vqa_acc", _vqa_task))
