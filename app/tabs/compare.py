"""Compare: this session's runs as a table (method, trainable parameters and %, metric zero-shot
and tuned, time, file size) and a chart of the metric against trainable parameters."""
from __future__ import annotations

import gradio as gr

from app import views
from app.sessions import session_of
from core import figures


def layout(page) -> None:
    with gr.Tab("Compare", id="compare"):
        page.refresh = gr.Button("Refresh")
        page.table = gr.Dataframe(headers=views.COMPARE_COLUMNS, label="This session's runs", interactive=False,
                                  elem_id="runs-table")
        page.compare_plot = gr.Plot(label="Metric against trainable parameters")


def wire(page) -> None:
    page.refresh.click(compare_runs, None, [page.table, page.compare_plot], api_name="compare")


def compare_runs(request: gr.Request):
    session = session_of(request)
    runs = [r for r in session.runs.values() if r.result.scored]
    rows = [views.compare_row(r.name, r.result, r.folder) for r in runs]
    return rows or None, figures.compare_figure([r.result for r in runs])
