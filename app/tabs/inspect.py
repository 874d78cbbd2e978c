"""Inspect: a run's parameter budget, what its gates or mode vectors learned (each method's own
figure, declared with the method), its per-token gates over a picture, and its training curves."""
from __future__ import annotations

import shutil
from typing import Optional

import gradio as gr

from app import views
from app.models import NO_RUN, media_path, tuned
from app.sessions import STORE, session_of
from core import checkpoint, figures, query
from core.export import export
from core.report import write_report
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
    try:
        chosen = session.runs[run]
        return str(write_report(chosen.folder, session.new_folder("reports", "run") / "report.html",
                                local_paths=chosen.local_paths))
    except USER_ERRORS as error:
        raise views.user_error(error) from error


def export_run(run: str, request: gr.Request) -> str:
    """The chosen run folded into its backbone, in open_clip's or transformers' own format, zipped."""
    session = session_of(request)
    if not isinstance(run, str) or run not in session.runs:
        raise gr.Error("choose one of this session's runs")
    chosen, folder = session.runs[run], session.new_folder("exports", "model")
    try:
        export(chosen.result.backbone, chosen.folder, folder / "model", local_paths=chosen.local_paths)
    except USER_ERRORS as error:
        STORE.remove(folder)
        raise views.user_error(error) from error
    return shutil.make_archive(str(folder / "exported"), "zip", folder / "model")


def inspect_run(run: str, pick: Optional[str], request: gr.Request):
    """The run's budget, its gates (on the picked picture for per-token gates) and its training curves."""
    session = session_of(request)
    if not isinstance(run, str) or run not in session.runs:
        raise gr.Error("choose one of this session's runs (tune one, or load weights)")
    with session.lock:
        chosen = session.runs[run]
        try:
            _, handle = session.models[tuned(session, chosen)]
            path = media_path(session, None, pick) if session.dataset is not None and pick else None
            caption = next((i.captions[0] for i in session.dataset.items if i.media == pick and i.captions), None) \
                if path else None
            view = query.read_gates(handle, path, caption or "a photo")
        except (query.QueryError, *USER_ERRORS) as error:
            raise views.user_error(error) from error
        budget = figures.budget_figure(handle.budget(), handle.backbone.num_backbone_params(),
                                       (chosen.folder / checkpoint.WEIGHTS).stat().st_size)
    overlay = (figures.patch_overlay_figure(view.picture, view.patch_map, f"vision gates over {pick} "
                                            f"(mean over layers and sub-layers)")
               if view.patch_map is not None else
               figures.message_figure("This run's method has no per-token vision gates to draw over the picture."))
    return (budget, figures.gate_figure(handle.method, handle.config, view.readout), overlay,
            figures.training_figure(chosen.result))
