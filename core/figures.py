"""Plotly figures of a run: its parameter budget, what its gates learned, its training curve,
and a session's runs side by side. Inputs are plain numbers (a run's result, a handle's
readout); nothing here touches a model."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.subplots import make_subplots

from core.pet import get_method
from core.result import RunResult
from core.tasks import headline_metric

if TYPE_CHECKING:
    from core.sweep import SweepResult

GATE_SCALE = "Viridis"


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def budget_figure(groups: dict[str, int], backbone_params: int, file_bytes: Optional[int] = None) -> go.Figure:
    """Trainable parameters by group against the whole backbone, on a log scale, with % of the backbone."""
    trainable = sum(groups.values())
    names = [*groups, "all trainable", "backbone"]
    counts = [*groups.values(), trainable, backbone_params]
    colours = ["#5b8def"] * len(groups) + ["#e8833a", "#9aa0a6"]
    labels = [f"{_human(c)} ({100.0 * c / backbone_params:.3g}%)" for c in counts]
    figure = go.Figure(go.Bar(x=[max(c, 1) for c in counts], y=names, orientation="h", marker_color=colours,
                              text=labels, textposition="outside", cliponaxis=False,
                              hovertemplate="%{y}: %{x:,} parameters<extra></extra>"))
    title = f"Trainable {trainable:,} of {backbone_params:,} parameters ({100.0 * trainable / backbone_params:.3g}%)"
    if file_bytes is not None:
        title += f" · saved file {file_bytes / 1024:,.1f} KiB"
    figure.update_layout(title=title, xaxis=dict(type="log", title="parameters (log scale)"),
                         yaxis=dict(autorange="reversed"), margin=dict(l=10, r=80, t=50, b=40),
                         height=140 + 32 * len(names))
    return figure


def _layer_site_matrix(readout: dict[str, torch.Tensor], tower: str) -> tuple[list[int], list[str], np.ndarray]:
    """VL-PET readout keys 'tower.layer.site' -> (layers, sites, mean gate per layer × site)."""
    cells = {}
    for key, gate in readout.items():
        name, layer, site = key.split(".")
        if name == tower:
            cells[int(layer), site] = float(gate.float().mean())
    layers = sorted({layer for layer, _ in cells})
    sites = [s for s in ("attn", "cross", "mlp") if any(site == s for _, site in cells)]
    matrix = np.full((len(layers), len(sites)), np.nan)
    for (layer, site), value in cells.items():
        matrix[layers.index(layer), sites.index(site)] = value
    return layers, sites, matrix


def _towers(keys) -> list[str]:
    return list(dict.fromkeys(key.split(".")[0] for key in keys))


def vlpet_gate_figure(readout: dict[str, torch.Tensor], granularity: str) -> go.Figure:
    """Mean gate G per layer and sub-layer, one heatmap per tower."""
    towers = _towers(readout)
    figure = make_subplots(rows=1, cols=len(towers), subplot_titles=[f"{t} tower" for t in towers])
    for column, tower in enumerate(towers, start=1):
        layers, sites, matrix = _layer_site_matrix(readout, tower)
        figure.add_trace(go.Heatmap(z=matrix, x=sites, y=[f"layer {i}" for i in layers], colorscale=GATE_SCALE,
                                    coloraxis="coloraxis",
                                    hovertemplate="%{y}, %{x}: mean G %{z:.3f}<extra></extra>"), 1, column)
    figure.update_layout(title=f"VL-PET gates ({granularity}): mean G per layer and sub-layer",
                         coloraxis=dict(colorscale=GATE_SCALE, colorbar=dict(title="G")),
                         height=max(320, 60 + 26 * max(len(_layer_site_matrix(readout, t)[0]) for t in towers)))
    for column in range(1, len(towers) + 1):
        figure.update_yaxes(autorange="reversed", row=1, col=column)
    return figure


def aurora_figure(readout: dict[str, torch.Tensor]) -> go.Figure:
    """Per tower: ‖λ‖ of every mode vector and ‖ΔW‖_F of every adapted projection, per layer;
    GQT γ and β per layer and channel when present."""
    towers = _towers(readout)
    gqt = [(t, part) for t in towers for part in ("gamma", "beta") if f"{t}.gqt_{part}" in readout]
    titles = [f"{t}: ‖λ‖ per layer" for t in towers] + [f"{t}: ‖ΔW‖_F per layer" for t in towers]
    titles += [f"{t}: GQT {part}" for t, part in gqt]
    rows = 2 + (1 if gqt else 0)
    columns = max(len(towers), len(gqt), 1)
    figure = make_subplots(rows=rows, cols=columns, subplot_titles=titles, vertical_spacing=0.12)
    for column, tower in enumerate(towers, start=1):
        for row, kind in enumerate(("modes", "delta_norm"), start=1):
            names = [k.split(".")[2] for k in readout if k.startswith(f"{tower}.{kind}.")]
            # One row per layer; fc1/fc2 hold a mode vector per quarter of the hidden layer: one norm for all.
            columns_of = [readout[f"{tower}.{kind}.{name}"].float() for name in names]
            layers = max(values.shape[0] for values in columns_of)
            matrix = np.full((layers, len(names)), np.nan)
            for j, values in enumerate(columns_of):
                matrix[:values.shape[0], j] = torch.linalg.norm(values.reshape(values.shape[0], -1), dim=1).numpy()
            figure.add_trace(go.Heatmap(z=matrix, x=names, y=[f"layer {i}" for i in range(layers)],
                                        colorscale=GATE_SCALE, showscale=False,
                                        hovertemplate="%{y}, %{x}: %{z:.4g}<extra></extra>"), row, column)
            figure.update_yaxes(autorange="reversed", row=row, col=column)
    for column, (tower, part) in enumerate(gqt, start=1):
        values = readout[f"{tower}.gqt_{part}"].float()
        values = values.reshape(values.shape[0], -1).numpy()
        figure.add_trace(go.Heatmap(z=values, y=[f"layer {i}" for i in range(values.shape[0])],
                                    colorscale="RdBu", zmid=0, showscale=False,
                                    hovertemplate="%{y}, channel %{x}: %{z:.4g}<extra></extra>"), rows, column)
        figure.update_yaxes(autorange="reversed", row=rows, col=column)
    figure.update_layout(title="Aurora: mode vectors λ, effective ΔW and GQT per layer", height=320 * rows)
    return figure


def message_figure(message: str) -> go.Figure:
    """An empty figure that says why there is nothing to draw."""
    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_layout(xaxis=dict(visible=False), yaxis=dict(visible=False), height=240)
    return figure


def gate_figure(method: str, config: Any, readout: dict[str, torch.Tensor]) -> go.Figure:
    """What a method's gates or mode vectors learned: the figure the method declares for its
    readout (core.pet.registry); a method without one has nothing of the kind to show."""
    figure = get_method(method).figure
    if figure is None or not readout:
        return message_figure(f"{method} has no gates or mode vectors to show: its budget is above.")
    return figure(config, readout)


def patch_overlay_figure(image: Image.Image, patch_map: torch.Tensor, title: str) -> go.Figure:
    """A (rows, cols) per-patch gate drawn over the picture it was computed on."""
    rows, cols = patch_map.shape
    side = 224
    picture = np.asarray(image.convert("RGB").resize((side, side)))
    figure = go.Figure(go.Image(z=picture))
    figure.add_trace(go.Heatmap(z=patch_map.float().numpy(), x0=side / cols / 2, dx=side / cols,
                                y0=side / rows / 2, dy=side / rows, opacity=0.55, colorscale=GATE_SCALE,
                                colorbar=dict(title="G"),
                                hovertemplate="patch (%{y:.0f}, %{x:.0f}): %{z:.3f}<extra></extra>"))
    figure.update_layout(title=title, height=420, xaxis=dict(visible=False), yaxis=dict(visible=False),
                         margin=dict(l=10, r=10, t=50, b=10))
    return figure


def training_figure(result: Optional[RunResult], live: Optional[list[float]] = None) -> go.Figure:
    """Loss per step, mean loss per epoch and (when scored) the test metric per epoch; with
    `live`, the losses of a tuning still running. A run whose learning rate a range test found
    (--lr auto) shows that test beside it: loss against learning rate, the chosen one marked."""
    train = result.train if result is not None else None
    steps = live if live is not None else (train.step_losses if train else [])
    found = train.lr_choice if train and live is None and train.lr_choice and train.lr_choice.lrs else None
    figure = make_subplots(rows=1, cols=2 if found else 1, column_widths=[0.62, 0.38] if found else None,
                           specs=[[{"secondary_y": True}, *([{}] if found else [])]],
                           subplot_titles=["", "Learning rate found" + (" (cached)" if found.reused else "")]
                           if found else None)
    figure.add_trace(go.Scatter(x=list(range(1, len(steps) + 1)), y=steps, mode="lines", name="loss per step",
                                line=dict(color="#5b8def")))
    epochs = train.epoch_losses if train and live is None else []
    if epochs and steps:
        per_epoch = len(steps) / len(epochs)
        x = [per_epoch * (i + 1) for i in range(len(epochs))]
        figure.add_trace(go.Scatter(x=x, y=epochs, mode="lines+markers", name="mean loss per epoch",
                                    line=dict(color="#e8833a")))
        if train.epoch_metrics:
            key = headline_metric(result.task)
            figure.add_trace(go.Scatter(x=x[:len(train.epoch_metrics)], y=[m[key] for m in train.epoch_metrics],
                                        mode="lines+markers", name=f"test {key} per epoch",
                                        line=dict(color="#34a853", dash="dot")), secondary_y=True)
            figure.update_yaxes(title_text=f"{key} (%)", secondary_y=True, row=1, col=1)
    if found:
        curve = go.Scatter(x=found.lrs, y=found.losses, mode="lines+markers", name="range test loss",
                           line=dict(color="#8e44ad"), hovertemplate="lr %{x:.2g}: loss %{y:.3f}<extra></extra>")
        figure.add_trace(curve, row=1, col=2)
        axis_x, axis_y = figure.data[-1].xaxis, figure.data[-1].yaxis
        # on a log axis plotly places a shape at the value itself but an annotation at its log10
        # (plotly.py #2580): the line and its label are placed each in its own units
        figure.add_vline(x=found.lr, line_dash="dash", line_color="#8e44ad", row=1, col=2)
        figure.add_annotation(x=math.log10(found.lr), xref=axis_x, y=1, yref=f"{axis_y} domain", yanchor="bottom",
                              xanchor="right", showarrow=False, text=f"chosen {found.lr:.2g}",
                              font=dict(color="#8e44ad"))
        figure.update_xaxes(type="log", title_text="learning rate", row=1, col=2)
        figure.update_yaxes(title_text="loss", row=1, col=2)
    figure.update_xaxes(title_text="step", row=1, col=1)
    figure.update_yaxes(title_text="loss", secondary_y=False, row=1, col=1)
    figure.update_layout(title="Training loss" + (" (live)" if live is not None else ""), height=360,
                         legend=dict(orientation="h", y=-0.25))
    return figure


def compare_figure(runs: list[RunResult]) -> go.Figure:
    """Each run's headline metric, tuned and zero-shot, against its trainable parameters (runs
    not scored by the first run's task's headline metric are left out)."""
    figure = go.Figure()
    key = headline_metric(runs[0].task if runs else "retrieval")
    same = [r for r in runs if key in r.tuned]
    x = [max(r.trainable_params, 1) for r in same]
    for name, scores, marker in (("tuned", "tuned", dict(size=12, color="#5b8def")),
                                 ("zero-shot", "zero_shot", dict(size=10, color="#9aa0a6", symbol="circle-open"))):
        figure.add_trace(go.Scatter(
            x=x, y=[getattr(r, scores)[key] for r in same], mode="markers+text" if name == "tuned" else "markers",
            text=[r.method for r in same], textposition="top center", marker=marker, name=name,
            hovertemplate="%{text}: %{x:,} trainable, " + f"{name} {key}" + " %{y:.1f}<extra></extra>"))
    if x:
        span = [math.log10(v) for v in x]
        figure.update_xaxes(range=[min(span) - 0.5, max(span) + 0.5])
    figure.update_layout(title="Metric against trainable parameters", yaxis_title=f"{key} (%)",
                         xaxis=dict(type="log", title="trainable parameters (log scale)"), height=400)
    return figure


def sweep_figure(result: "SweepResult") -> go.Figure:
    """A sweep's headline metric per method — mean over seeds with a ±1 std error bar — against
    its trainable parameters (log scale), and the zero-shot score as a line."""
    key = headline_metric(result.task)
    methods = [m for m in result.methods if key in m.metrics]
    x = [max(m.trainable_params, 1) for m in methods]
    figure = go.Figure(go.Scatter(
        x=x, y=[m.metrics[key][0] for m in methods], mode="markers+text", text=[m.label for m in methods],
        textposition="top center", error_y=dict(type="data", array=[m.metrics[key][1] for m in methods]),
        marker=dict(size=12, color="#5b8def"), name=f"tuned (mean ± std over each method's finished seeds, of {len(result.seeds)})",
        hovertemplate="%{text}: %{x:,} trainable, " + key + " %{y:.1f}<extra></extra>"))
    if methods:
        zero_shot = sum(m.zero_shot[key] for m in methods) / len(methods)
        figure.add_hline(y=zero_shot, line_dash="dash", line_color="#9aa0a6",
                         annotation_text=f"zero-shot {zero_shot:.1f}", annotation_position="bottom right")
        span = [math.log10(v) for v in x]
        figure.update_xaxes(range=[min(span) - 0.5, max(span) + 0.5])
    figure.update_layout(title="Methods compared: metric against trainable parameters", yaxis_title=f"{key} (%)",
                         xaxis=dict(type="log", title="trainable parameters (log scale)"), height=420)
    return figure
