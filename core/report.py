"""A report students can keep: one self-contained HTML file for a run or a sweep — plotly and
every figure embedded, so it opens with no network — holding the run cards, the budget, what
the gates learned, the training curves, the comparison chart and the exact command that
reproduces it (backbone spec, dataset fingerprint, seeds, options)."""
from __future__ import annotations

import html
import json
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import plotly.graph_objects as go
import plotly.offline
import torch
from PIL import Image

from core import checkpoint, figures
from core.backbones import Backbone, BackboneError, load_backbone
from core.pet import get_method
from core.result import RunResult
from core.runs import RunError, attach_run
from core.sweep import SWEEP_INFO, SweepResult, read_sweep
from core.tasks import metric_label
from core.trainer import pick_device

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
code, pre { background: #f4f4f4; padding: 2px 4px; } pre { padding: 8px; white-space: pre-wrap; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 2em; }
"""


def _figure(figure: go.Figure) -> str:
    return figure.to_html(full_html=False, include_plotlyjs=False)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def run_command(result: RunResult) -> str:
    """The CLI command that reproduces a run (the data named by its fingerprint)."""
    options = ""
    for key, value in result.config.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            options += f" --{'' if value else 'no-'}{flag}"
        elif value != []:   # an empty list is the option's default (e.g. every tower)
            options += f" --{flag} {','.join(value) if isinstance(value, list) else value}"
    train = result.train
    shots = f" --shots {train.shots}" if train and train.shots else ""   # none given: every training item
    settings = f" --epochs {train.epochs} --lr {train.started_at:g} --batch-size {train.batch_size}" if train else ""
    precision = train and (train.precision or ("bf16" if train.bf16 else "fp32"))
    settings += f" --precision {precision}" if train and precision != "auto" else ""
    settings += f" --recipe {result.recipe.name}" if result.recipe and result.recipe.name != "studio" else ""
    settings += f" --answers '{','.join(result.extra_answers)}'" if result.extra_answers else ""
    return (f"python -m core tune --model {result.backbone} --data DATA --task {result.task} --method {result.method}"
            f"{options}{shots}{settings} --seed {result.seed} --frames {result.frames}")


# (spec, seed) -> a context holding that frozen backbone: the app lends its shared ones
Backbones = Callable[[str, int], AbstractContextManager[Backbone]]


def loading_backbones(local_paths: bool) -> Backbones:
    """Each backbone loaded once for a whole report, on the device a run would use: the runs of a sweep
    share it, each run's weights attached for its gates and taken off again. Without `local_paths` a
    backbone may not name a server path (an uploaded run)."""
    loaded: dict[tuple[str, int], Backbone] = {}

    @contextmanager
    def frozen(spec: str, seed: int) -> Iterator[Backbone]:
        if (spec, seed) not in loaded:
            loaded[spec, seed] = load_backbone(spec, seed, local_paths=local_paths).to(pick_device()).eval()
        yield loaded[spec, seed]

    return frozen


def _gates(folder: Path, result: RunResult, backbones: Backbones) -> go.Figure:
    """What the run's gates learned, read on a plain grey picture and a plain text (a method with
    nothing of the kind to show needs no model)."""
    if get_method(result.method).figure is None:
        return figures.gate_figure(result.method, result.config, {})
    try:
        with backbones(result.backbone, result.seed) as backbone, torch.no_grad():
            handle, _ = attach_run(backbone, folder, restorable=True)
            try:
                grey = Image.new("RGB", (224, 224), (128, 128, 128))
                pixels = backbone.image_transform(grey)[None].to(backbone.device)
                readout = {name: t.float().cpu() for name, t in
                           handle.gate_readout(pixels, backbone.tokenize(["a photo"]).to(backbone.device)).items()}
                return figures.gate_figure(result.method, handle.config, readout)
            finally:
                handle.detach()
    except (BackboneError, checkpoint.CheckpointError) as error:
        return figures.message_figure(f"the gates need the run's backbone, which could not be loaded: {error}")


def _run_section(folder: Path, result: RunResult, title: str, backbones: Backbones) -> str:
    weights = folder / checkpoint.WEIGHTS
    rows = [[metric_label(k), f"{result.zero_shot[k]:.1f}", f"{v:.1f}", f"{v - result.zero_shot[k]:+.1f}"]
            for k, v in result.tuned.items()]   # zero-shot has the same metrics (core.checkpoint)
    card = (f"<p><b>{html.escape(result.method)}</b> on <code>{html.escape(result.backbone)}</code> — "
            f"{html.escape(result.backbone_weights)}; task {result.task}; dataset fingerprint "
            f"<code>{html.escape(result.dataset.fingerprint)}</code> ({result.dataset.train_used} training items); "
            f"{result.train.epochs} epochs at lr {result.train.lr:g}, seed {result.seed}; "
            f"{result.seconds:.0f} s on {html.escape(result.train.device)}"
            f"{' (cancelled early)' if result.train.cancelled else ''}.</p>")
    note = "".join(f"<p><b>{label}</b> {html.escape(text)}</p>" for label, text in
                   (("⚠", result.unsaid_warning), (result.note_label, result.note)) if text)
    return "".join([
        f"<h2>{html.escape(title)}</h2>", card, note,
        _table(["metric (test split)", "zero-shot", "tuned", "change"], rows),
        _figure(figures.budget_figure(result.groups, result.backbone_params,
                                      weights.stat().st_size if weights.is_file() else None)),
        _figure(_gates(folder, result, backbones)), _figure(figures.training_figure(result)),
        f"<p>Reproduce:</p><pre>{html.escape(run_command(result))}</pre>"])


def _sweep_sections(sweep: SweepResult, backbones: Backbones) -> list[str]:
    keys = list(sweep.methods[0].metrics) if sweep.methods else []
    rows = [[f"{m.label} ⚠ {m.warning}" if m.warning else m.label, f"{m.trainable_params:,}", f"{m.trainable_pct:.4g}",
             *(f"{m.metrics[k][0]:.1f} ± {m.metrics[k][1]:.1f}" for k in keys), f"{m.seconds:.1f}",
             f"{m.file_bytes / 1024:.1f}"] for m in sweep.methods]
    status = " — cancelled: the runs that finished" if sweep.cancelled else ""
    sections = [f"<h2>Methods compared{status}</h2>",
                f"<p><code>{html.escape(sweep.model)}</code>, dataset fingerprint <code>{html.escape(sweep.fingerprint)}</code>, "
                f"task {sweep.task}, {sweep.shots or 'all'} shots, {sweep.epochs} epochs, seeds "
                f"{', '.join(map(str, sweep.seeds))}; the whole sweep took {sweep.seconds:.0f} s.</p>",
                f"<p><b>Note:</b> {html.escape(sweep.note)}</p>" if sweep.note else "",
                _table(["method", "trainable", "% of backbone", *(f"{metric_label(k)} (mean ± std)" for k in keys),
                        "seconds per run", "file KiB"], rows),
                _figure(figures.sweep_figure(sweep)),
                f"<p>Reproduce:</p><pre>{html.escape(sweep.command)}</pre>"]
    for summary in sweep.methods:
        folder = Path(summary.runs[0])
        result, _ = checkpoint.read(folder)
        if not result.scored or result.task != sweep.task:
            raise RunError(f"{folder}: not a scored {sweep.task} run, as the sweep it is in says")
        sections.append(_run_section(folder, result, f"{summary.label}, seed {result.seed}", backbones))
    return sections


def write_report(source: str | Path, out: str | Path, title: Optional[str] = None, local_paths: bool = True,
                 backbones: Optional[Backbones] = None) -> Path:
    """The report of a run folder (run.json) or a sweep folder (sweep.json), written to `out`.
    Without `local_paths` a run's backbone may not name a server path (an uploaded run). The gates
    are read on `backbones` (default: each loaded once for this report)."""
    source, out = Path(source), Path(out)
    backbones = backbones or loading_backbones(local_paths)
    if (source / SWEEP_INFO).is_file():
        sweep = read_sweep(source)
        body, heading = _sweep_sections(sweep, backbones), title or f"PET Studio: methods compared on {sweep.model}"
    elif (source / checkpoint.RUN_INFO).is_file():
        result, _ = checkpoint.read(source)
        if not result.scored:
            raise RunError(f"{source}: the run has no scores to report (it was never tuned here)")
        body, heading = [_run_section(source, result, f"{result.method} on {result.backbone}", backbones)], \
            title or f"PET Studio: {result.method} on {result.backbone}"
    else:
        raise RunError(f"{source}: neither a run folder (run.json) nor a sweep folder ({SWEEP_INFO})")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title>"
            f"<style>{STYLE}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
            f"</head><body><h1>{html.escape(heading)}</h1>{''.join(body)}"
            f"<p><small>Made by PET Studio. Versions: "
            f"{html.escape(json.dumps(checkpoint.package_versions()))}</small></p></body></html>")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except (OSError, ValueError) as error:   # a folder, a name too long, a NUL byte
        raise RunError(f"{str(out)[:200]}: the report cannot be written there ({error})") from error
    return out
