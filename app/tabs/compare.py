"""Compare: this session's runs as a table and a chart of metric against trainable parameters;
and "Compare methods" — several methods × seeds in one job with the Tune tab's backbone and
settings, shown as mean ± std per method, with a self-contained HTML report to keep."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import gradio as gr
import pandas as pd

from app import views
from app.models import LOCAL_PATHS, MODELS, run_choices, spec_of
from app.sessions import STORE, Run, session_of
from app.controls import options_by_method, whole
from app.device import on_device, query_seconds
from app.tuning import (TUNING_CONCURRENCY, claim_folders, load_for_report, planned_seconds, read_progress,
                        report_on_device, request_cancel, run_polling, sweep_on_device)
from core import checkpoint, figures
from core.pet import METHODS
from core.runs import USER_ERRORS, check_settings
from core.cache import ScoreCache
from core.lr_range import ChoiceCache
from core.sweep import MethodChoice, check_choices
from core.tasks import headline_metric, metric_label

COMPARED = ("aurora", "vlpet", "lora", "linear_probe")   # the default one-click comparison
SWEEP_COLUMNS = ["method", "trainable params", "% of backbone", "zero-shot", "each metric (mean ± std)",
                 "seconds per run", "file KiB"]


def layout(page) -> None:
    with gr.Tab("Compare", id="compare"):
        page.refresh = gr.Button("Refresh")
        page.table = gr.Dataframe(headers=views.COMPARE_COLUMNS, label="This session's runs", interactive=False,
                                  elem_id="runs-table")
        page.compare_plot = gr.Plot(label="Metric against trainable parameters")
        with gr.Accordion("Compare methods: every chosen method × seeds in one job (the Tune tab's backbone, "
                          "task, recipe, shots, epochs, batch size and frames; each method at the learning rate found "
                          "on your data, or its recipe's)",
                          open=True):
            with gr.Row():
                page.sweep_methods = gr.CheckboxGroup([(m.label, m.name) for m in METHODS.values()],
                                                      value=list(COMPARED), label="Methods")
                page.sweep_seeds = gr.Textbox("0,1,2", label="Seeds, comma-separated")
            with gr.Row():
                page.compare_methods = gr.Button("Compare methods", variant="primary")
                page.stop_sweep = gr.Button("Stop", variant="stop")
            page.sweep_status = gr.Markdown()
            page.sweep_table = gr.Dataframe(headers=SWEEP_COLUMNS, label="Methods compared", interactive=False,
                                            elem_id="sweep-table")
            page.sweep_plot = gr.Plot(label="Mean metric (± std over seeds) against trainable parameters")
            page.sweep_report = gr.File(label="Report (one HTML file: opens with no network)", interactive=False)
            page.sweep_options = gr.JSON(visible=False)   # {method: options}, as the Tune tab's controls are set


def wire(page) -> None:
    page.refresh.click(compare_runs, None, [page.table, page.compare_plot], api_name="compare")
    inputs = [page.model, page.task, page.sweep_methods, page.sweep_options, page.sweep_seeds, page.shots, page.epochs,
              page.batch_size, page.frames, page.precision, page.recipe]
    controls = page.method_controls
    page.compare_methods.click(   # under the authors' recipe the options are the recipe's
        lambda recipe, *values: {} if recipe != "studio" else options_by_method(controls, list(values)),
        [page.recipe, *(c for *_, c in controls)], [page.sweep_options],
        api_name="options_by_method", queue=False).then(
        compare_methods, inputs, [page.sweep_table, page.sweep_plot, page.sweep_report, page.sweep_status, page.ask_run,
                                  page.inspect_run], api_name="compare_methods",
        concurrency_limit=TUNING_CONCURRENCY, concurrency_id="tuning").then(
        compare_runs, None, [page.table, page.compare_plot], api_name="compare_after_sweep")
    page.stop_sweep.click(stop, None, [page.sweep_status], api_name="stop_sweep", queue=False)


def compare_runs(request: gr.Request):
    session = session_of(request)
    runs = [r for r in session.runs.values() if r.result.scored]
    rows = [views.compare_row(r.name, r.result, r.folder) for r in runs]
    return rows or None, figures.compare_figure([r.result for r in runs])


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text or "").split(",") if s.strip()]
    except ValueError as error:
        raise gr.Error(f"seeds are whole numbers separated by commas, not {text!r:.60}") from error
    if not seeds or len(seeds) > 10:
        raise gr.Error("give from one to ten seeds")
    return seeds


def compare_methods(model: str, task: str, methods: list[str], options: Optional[dict], seeds: str, shots: float,
                    epochs: float, batch_size: float, frames: float, precision: str, recipe: str,
                    request: gr.Request,
                    progress=gr.Progress(track_tqdm=True)):
    """Every chosen method × seed on the session's dataset, each method from `recipe` (studio or
    authors) with its `options` ({method: {option: value}}; the app sends the Tune tab's controls);
    returns the per-method table, the chart, the report file, the status line and the updated run
    pickers."""
    session = session_of(request)
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) and m in METHODS for m in methods):
        raise gr.Error(f"choose methods among {', '.join(METHODS)}")
    if options is not None and not isinstance(options, dict):   # an API client's
        raise gr.Error(f"options must be a JSON object of method: its options, not {options!r:.60}")
    options = options or {}
    choices = [MethodChoice(m, options.get(m) or {}) for m in methods]
    try:   # each method's options, and the methods together, checked before anything runs
        check_choices(choices)
    except USER_ERRORS as error:
        raise views.user_error(error) from error
    arguments = dict(model=spec_of(model), choices=choices, seeds=_seeds(seeds),
                     shots=whole(shots, "shots") or None, epochs=whole(epochs, "epochs"),
                     batch_size=whole(batch_size, "batch size"), task=task, frames=whole(frames, "frames"),
                     precision=precision, local_paths=LOCAL_PATHS, recipe=recipe, budget=MODELS.weights_budget,
                     zero_shot_cache=ScoreCache(session.folder / "zero-shot"),
                     lr_cache=ChoiceCache(session.folder / "lr-range"))
    try:   # refused before any folder or device time is taken
        for seed in arguments["seeds"]:
            check_settings(seed=seed, **{k: arguments[k] for k in ("shots", "epochs", "batch_size", "frames")})
        MODELS.refuse_oversized(arguments["model"])
    except USER_ERRORS as error:
        raise views.user_error(error) from error
    live, out, data = claim_folders(session, "sweeps", "compare")

    def show_step() -> None:
        steps = read_progress(live)
        if steps:
            last = steps[-1]
            progress(last["fraction"], desc=f"run {last['run'] + 1}/{last['runs']}: {last['label']}, "
                                             f"seed {last['seed']} · step {last['step']}/{last['total_steps']}")

    seconds = sum(planned_seconds(session.dataset, arguments["model"], task, method, arguments["shots"],
                                  arguments["epochs"], arguments["batch_size"], runs=len(arguments["seeds"]),
                                  epoch_metrics=False)[0] for method in methods)
    arguments.update(data=data, out=out / "runs")
    try:
        result = run_polling(on_device, show_step, sweep_on_device, str(live), len(session.dataset.split("test")),
                             arguments, seconds=seconds)
        if request.session_hash not in STORE:   # the page was closed meanwhile: leave nothing behind
            raise gr.Error("this page's session was closed while it was comparing")
        load_for_report(result.model, arguments["seeds"][0], LOCAL_PATHS, methods)   # the model the runs were tuned on
        report = on_device(report_on_device, str(out / "runs"), str(out / "report.html"), LOCAL_PATHS,
                           seconds=query_seconds(arguments["model"], 1) * len(choices))
    except Exception as error:
        STORE.remove(out if request.session_hash in STORE else session.folder)
        if isinstance(error, USER_ERRORS):
            raise views.user_error(error) from error
        raise
    finally:
        session.tuning = False
    for summary in result.methods:
        for folder in summary.runs:
            info, _ = checkpoint.read(folder)
            name = f"{len(session.runs) + 1} · {info.method} · {info.backbone} · seed {info.seed}"
            session.runs[name] = Run(name, Path(folder), info, local_paths=LOCAL_PATHS)
    if result.note:
        gr.Warning(result.note)
    headline = headline_metric(result.task)
    keys = list(result.methods[0].metrics) if result.methods else [headline]
    table = pd.DataFrame(
        [[f"{m.label} ⚠ {m.warning}" if m.warning else m.label, m.trainable_params, round(m.trainable_pct, 4), round(m.zero_shot[headline], 1),
          *(f"{m.metrics[k][0]:.1f} ± {m.metrics[k][1]:.1f}" for k in keys), round(m.seconds, 1),
          round(m.file_bytes / 1024, 1)] for m in result.methods],
        columns=["method", "trainable params", "% of backbone", f"zero-shot {metric_label(headline)}",
                 *(f"{metric_label(k)} (mean ± std)" for k in keys), "seconds per run", "file KiB"])
    status = f"{'stopped early: ' if result.cancelled else ''}{sum(len(m.runs) for m in result.methods)} runs in " \
             f"{result.seconds:.0f} s"
    return table, figures.sweep_figure(result), str(report), status, *run_choices(session, None)


def stop(request: gr.Request) -> str:
    """Stop the comparison after the current step; the runs that finished are kept."""
    return request_cancel(session_of(request))
