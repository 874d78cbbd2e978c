"""How results read on the page: Markdown cards and table rows from core's plain results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.figures import headline_metric

METRIC_NAMES = {
    "t2i_r1": "text→image R@1", "t2i_r5": "text→image R@5", "t2i_r10": "text→image R@10",
    "i2t_r1": "image→text R@1", "i2t_r5": "image→text R@5", "i2t_r10": "image→text R@10",
    "t2i_medr": "text→image median rank", "i2t_medr": "image→text median rank", "vqa_acc": "VQA accuracy",
}
COMPARE_COLUMNS = ["run", "method", "backbone", "trainable params", "% of backbone", "metric", "zero-shot",
                   "tuned", "seconds", "file KiB"]


def dataset_stats(label: str, dataset) -> str:
    stats = dataset.stats()
    kind = dataset.items[0].kind if dataset.items else "image"
    return (f"**{label}** — {stats['items']} {kind}s, {stats['captions']} captions, {stats['questions']} "
            f"questions · train {stats['train']}, test {stats['test']} · manifest `{dataset.manifest}`")


def validation_report(problems: list) -> str:
    if not problems:
        return "✓ **Validation:** every row checked, no problems."
    lines = "\n".join(f"- `{p}`" for p in problems)
    return f"✗ **Validation: {len(problems)} problem(s)** — nothing was loaded.\n\n{lines}"


def preview_caption(item) -> str:
    parts = item.captions[:1] + [f"Q: {qa.question} A: {' / '.join(dict.fromkeys(qa.answers))}" for qa in item.qa[:1]]
    return " · ".join(parts) or item.media


def _metric(value: float, key: str) -> str:
    return f"{value:.1f}" if key.endswith("medr") else f"{value:.1f}%"


def run_card(name: str, result: dict[str, Any]) -> str:
    """Before/after metrics and the budget of a run."""
    rows = []
    for key, tuned in result["tuned"].items():
        before = result["zero_shot"].get(key)
        change = "" if before is None else f"{tuned - before:+.1f}"
        rows.append(f"| {METRIC_NAMES.get(key, key)} | {_metric(before, key) if before is not None else '—'} "
                    f"| **{_metric(tuned, key)}** | {change} |")
    train = result.get("train", {})
    groups = ", ".join(f"{g} {n:,}" for g, n in result.get("groups", {}).items()) or "none"
    status = " (cancelled early)" if train.get("cancelled") else ""
    lines = [f"### {name}{status}",
             f"**{result['method']}** on `{result['backbone']}` · task {result['task']} · "
             f"{result['dataset']['train_used']} training items, {train.get('epochs', 0)} epochs, "
             f"lr {train.get('lr', 0):g} · {result['seconds']:.0f} s on {train.get('device', 'cpu')}",
             "", "| metric (test split) | zero-shot | tuned | change |", "|---|---|---|---|", *rows, "",
             f"**Budget:** {result['trainable_params']:,} trainable of {result['backbone_params']:,} "
             f"({result['trainable_pct']:.4g}%) — {groups}"]
    if result.get("note"):
        lines.insert(1, f"> **Note:** {result['note']}")
    return "\n".join(lines)


def compare_row(name: str, result: dict[str, Any], folder: Path) -> list:
    key = headline_metric(result["tuned"])
    weights = folder / "pet.safetensors"
    return [name, result["method"], result["backbone"], result["trainable_params"],
            round(result["trainable_pct"], 4), METRIC_NAMES.get(key, key),
            round(result["zero_shot"].get(key, float("nan")), 1), round(result["tuned"][key], 1),
            round(result.get("seconds", 0.0), 1),
            round(weights.stat().st_size / 1024, 1) if weights.is_file() else None]
