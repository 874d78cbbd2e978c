"""Inspect: a run's parameter budget, what its gates or mode vectors learned (each method's own
figure, declared with the method), its per-token gates over a picture, and its training curves."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Optional

import gradio as gr

from app import views
from app.device import Call, on_device, query_seconds
from app.models import MODELS, NO_RUN, ModelKey, media_path, run_model
from app.sessions import STORE, session_of
from app.tuning import load_for_report, report_on_device
from core import checkpoint, figures, query
from core.export import export
from core.runs import USER_ERRORS


def layout(page) -> None:
    with gr.Tab("Inspect", id="inspect"):
        with gr.Row():
            page.inspect_run = gr.Dropdown([NO_RUN], value=NO_RUN, label="Run")
            page.inspect_pick = gr.Dropdown([], label="Picture for the gates (its first caption is the text)")
            page.inspect = gr.Button("Inspect", variant="primary")
            page.run_report = gr.Button("Report of this run (HTML)")
            page.export_run = gr.Button("Export for open_clip / transformers")
        with gr.Row():
            page.run_report_file = gr.File(label="Report (one HTML file: opens with no network)", interactive=False)
            page.exported = gr.File(label="The run folded into its backbone (.zip: weights, model card)",
                                    interactive=False)
        page.budget_plot = gr.Plot(label="Parameter budget")
        page.gates_plot = gr.Plot(label="Gates")
        page.overlay_plot = gr.Plot(label="Gates over the picture")
        page.curves_plot = gr.Plot(label="Loss and metrics per epoch")


def wire(page) -> None:
    page.inspect.click(inspect_run, [page.inspect_run, page.inspect_pick],
                       [page.budget_plot, page.gates_plot, page.overlay_plot, page.curves_plot],
                       api_name="inspect", concurrency_id="inference")
    page.run_report.click(run_report, [page.inspect_run], [page.run_report_file], api_name="run_report",
                          concurrency_id="inference")
    page.export_run.click(export_run, [page.inspect_run], [page.exported], api_name="export",
                          concurrency_id="inference")


def run_report(run: str, request: gr.Request) -> str:
    """A self-contained HTML report of the chosen run: its card, budget, gates, curves, command."""
    session = session_of(request)
    if not isinstance(run, str) or run not in session.runs or not session.runs[run].result.scored:
        raise gr.Error("choose one of this session's tuned runs")
    chosen = session.runs[run]
    load_for_report(chosen.result.backbone, chosen.result.seed, chosen.local_paths, [chosen.result.method])
    with session.lock:
        out = session.new_folder("reports", "run", replacing=True) / "report.html"
    return on_device(report_on_device, str(chosen.folder), str(out), chosen.local_paths,
                     seconds=query_seconds(chosen.result.backbone, 1))


def export_run(run: str, request: gr.Request) -> str:
    """The chosen run folded into its backbone, in open_clip's or transformers' own format, zipped."""
    session = session_of(request)
    if not isinstance(run, str) or run not in session.runs:
        raise gr.Error("choose one of this session's runs")
    with session.lock:
        chosen, folder = session.runs[run], session.new_folder("exports", "model", replacing=True)
    try:
        export(chosen.result.backbone, chosen.folder, folder / "model", local_paths=chosen.local_paths,
               budget=MODELS.weights_budget)
    except USER_ERRORS as error:
        STORE.remove(folder)
        raise views.user_error(error) from error
    archive = shutil.make_archive(str(folder / "exported"), "zip", folder / "model")
    STORE.remove(folder / "model")   # the archive is what is sent
    return archive


@dataclass
class Gates:
    """What a run's inspection needs from its model, read on the device."""

    view: query.GateView
    budget: dict[str, int]
    backbone_params: int
    method: str
    config: Any


def _read_gates_on(call: Call, key: ModelKey, path: Optional[str], text: str) -> Gates:
    with MODELS.on(call, key) as (backbone, handle):
        view = query.read_gates(handle, path, text)
        on_host = query.GateView({name: t.cpu() for name, t in view.readout.items()}, view.picture,
                                 view.patch_map.cpu() if view.patch_map is not None else None)
        return Gates(on_host, handle.budget(), backbone.num_backbone_params(), handle.method, handle.config)


def inspect_run(run: str, pick: Optional[str], request: gr.Request):
    """The run's budget, its gates (on the picked picture for per-token gates) and its training curves."""
    session = session_of(request)
    if not isinstance(run, str) or run not in session.runs:
        raise gr.Error("choose one of this session's runs (tune one, or load weights)")
    with session.lock:
        chosen = session.runs[run]
        path = media_path(session, None, pick) if session.dataset is not None and pick else None
        caption = next((i.captions[0] for i in session.dataset.items if i.media == pick and i.captions), None) \
            if path else None
        MODELS.load([run_model(chosen)])
        gates = on_device(_read_gates_on, run_model(chosen), str(path) if path else None, caption or "a photo",
                          seconds=query_seconds(chosen.result.backbone, 1))
    budget = figures.budget_figure(gates.budget, gates.backbone_params,
                                   (chosen.folder / checkpoint.WEIGHTS).stat().st_size)
    view = gates.view
    overlay = (figures.patch_overlay_figure(view.picture, view.patch_map, f"vision gates over {pick} "
                                            f"(mean over layers and sub-layers)")
               if view.patch_map is not None else
               figures.message_figure("This run's method has no per-token vision gates to draw over the picture."))
    return (budget, figures.gate_figure(gates.method, gates.config, view.readout), overlay,
            figures.training_figure(chosen.result))
