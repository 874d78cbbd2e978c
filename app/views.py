"""How results read on the page: Markdown cards and table rows from core's plain results, the
files a run offers for download, and core's user errors as the page shows them."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from core import checkpoint
from core.markdown import plain
from core.result import RunResult
from core.tasks import headline_metric, metric_label

COMPARE_COLUMNS = ["run", "method", "backbone", "trainable params", "% of backbone", "metric", "zero-shot",
                   "tuned", "seconds", "file KiB"]


def dataset_stats(label: str, dataset) -> str:
    stats = dataset.stats()
    kind = dataset.items[0].kind if dataset.items else "image"
    return (f"**{plain(label)}** — {stats['items']} {kind}s, {stats['captions']} captions, {stats['questions']} "
            f"questions · train {stats['train']}, test {stats['test']} · manifest {plain(dataset.manifest)}")


def validation_report(problems: list) -> str:
    if not problems:
        return "✓ **Validation:** every row checked, no problems."
    lines = "\n".join(f"- {plain(p)}" for p in problems)
    return f"✗ **Validation: {len(problems)} problem(s)** — nothing was loaded.\n\n{lines}"


def preview_caption(item) -> str:
    parts = item.captions[:1] + [f"Q: {qa.question} A: {' / '.join(dict.fromkeys(qa.answers))}" for qa in item.qa[:1]]
    return " · ".join(parts) or item.media


def _metric(value: float, key: str) -> str:
    return f"{value:.1f}" if key.endswith("medr") else f"{value:.1f}%"


def run_card(name: str, result: RunResult) -> str:
    """Before/after metrics and the budget of a scored run."""
    rows = []
    for key, tuned in result.tuned.items():   # zero-shot has the same metrics (core.checkpoint)
        before = result.zero_shot[key]
        rows.append(f"| {metric_label(key)} | {_metric(before, key)} | **{_metric(tuned, key)}** | {tuned - before:+.1f} |")
    train = result.train
    groups = ", ".join(f"{plain(g)} {n:,}" for g, n in result.groups.items()) or "none"
    status = " (cancelled early)" if train.cancelled else ""
    lines = [f"### {plain(name)}{status}",
             f"**{plain(result.method)}** on {plain(result.backbone)} · task {plain(result.task)} · "
             f"{result.dataset.train_used} training items, {train.epochs} epochs, "
             f"lr {train.lr:g} · {result.seconds:.0f} s on {plain(train.device)}",
             "", "| metric (test split) | zero-shot | tuned | change |", "|---|---|---|---|", *rows, "",
             f"**Budget:** {result.trainable_params:,} trainable of {result.backbone_params:,} "
             f"({result.trainable_pct:.4g}%) — {groups}"]
    if train.lr_choice is not None:
        cached = " (measured by an earlier run on this data, reused)" if train.lr_choice.reused else ""
        lines.insert(2, f"Learning rate found: {plain(train.lr_choice.why)}{cached}")
    elif train.lr_given:   # a restart's lower rate is the note's
        lines.insert(2, f"Learning rate given: {train.started_at:g}, used as given")
    if result.recipe is not None and result.recipe.name != "studio":
        lines.insert(2, f"Recipe **{plain(result.recipe.name)}**: {plain(result.recipe.source)}")
    if result.note:
        lines.insert(1, f"> **{result.note_label}** {plain(result.note)}")
    if result.unsaid_warning:
        lines.insert(1, f"> **⚠ {result.unsaid_warning}**")
    return "\n".join(lines)


def compare_row(name: str, result: RunResult, folder: Path) -> list:
    key = headline_metric(result.task)
    weights = folder / checkpoint.WEIGHTS
    shown = f"{name} ⚠ {'; '.join(result.flags)}" if result.flags else name
    return [shown, result.method, result.backbone, result.trainable_params, round(result.trainable_pct, 4),
            metric_label(key), round(result.zero_shot[key], 1), round(result.tuned[key], 1),
            round(result.seconds, 1), round(weights.stat().st_size / 1024, 1) if weights.is_file() else None]


def weights_files(folder: Path) -> list[str]:
    return [str(folder / checkpoint.WEIGHTS), str(folder / checkpoint.RUN_INFO)]


def user_error(error: Exception) -> gr.Error:
    """A user error (core's message, naming file and row) shown until it is closed."""
    return gr.Error(str(error), duration=None)
