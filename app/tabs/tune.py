"""Tune: backbone, task, method and its main options (controls generated from what each method
declares, core.pet.registry), training settings; Start shows progress and a live loss curve,
Cancel stops after the current step, and the result is a before/after card with the weights."""
from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from app import views
from app.controls import control, number, number_field, options_by_method, whole
from app.device import GPU_SECONDS, ZERO_GPU, granted_seconds, on_device, record_step_time
from app.models import LOCAL_PATHS, MODELS, run_choices, spec_of
from app.sessions import STORE, Run, Session, session_of
from app.tabs.compare import compare_runs
from app.tuning import (CANCEL_FILE, TUNING_CONCURRENCY, claim_folders, planned_seconds, training_steps,
                        request_cancel, run_polling, tune_on_device)
from core import figures
from core.backbones import describe_spec
from core.data.media import DEFAULT_FRAMES
from core.pet import METHODS, get_method, make_config
from core.pet.recipes import RECIPES
from core.runs import USER_ERRORS, check_settings
from core.cache import ScoreCache
from core.lr_range import ChoiceCache
from core.tasks import TASKS
from core.trainer import PRECISIONS, autocast_for, pick_device

BACKBONES = [
    ("Offline model (bundled, works with no network)", "offline"),
    ("open_clip ViT-B-32 · openai", "openclip:ViT-B-32:openai"),
    ("open_clip ViT-B-16 · laion2b_s34b_b88k", "openclip:ViT-B-16:laion2b_s34b_b88k"),
    ("BLIP base retrieval · Salesforce/blip-itm-base-coco", "blip:Salesforce/blip-itm-base-coco"),
    ("BLIP base VQA · Salesforce/blip-vqa-base", "blip-vqa:Salesforce/blip-vqa-base"),
    ("PETStudio-Tiny (random init, for trying things out)", "openclip:PETStudio-Tiny"),
]
FIRST_METHOD = next(iter(METHODS))
NO_ESTIMATE = "*Load a dataset to see how long a tuning takes.*"
RECIPE_LABELS = {"studio": "PET Studio's defaults (set the knobs yourself)",
                 "authors": "The authors' (what they ran for this backbone, task and media)"}
AUTHORS_NOTE = ("The method's options and learning rate come from its authors' recipe for this backbone, task and "
                "media (a method without one keeps its defaults, and its rate is found on your data); a learning "
                "rate typed in wins. The run card and "
                "run.json say what the recipe set.")


def layout(page) -> None:
    with gr.Tab("Tune", id="tune"):
        with gr.Row():
            with gr.Column(scale=1):
                page.model = gr.Dropdown(BACKBONES, value="offline", allow_custom_value=True,
                                         label="Backbone (or type any openclip:NAME:TAG, blip:HUB_ID, a local path)")
                page.model_note = gr.Markdown(model_notice("offline"))
                page.task = gr.Radio(list(TASKS), value="retrieval", label="Task")
                page.method = gr.Dropdown([(m.label, m.name) for m in METHODS.values()], value=FIRST_METHOD,
                                          label="Method")
                page.recipe = gr.Radio([(RECIPE_LABELS[name], name) for name in RECIPES], value="studio",
                                       label="Recipe", info="whose settings the run starts from")
                page.recipe_note = gr.Markdown(AUTHORS_NOTE, visible=False)
                page.method_groups, page.method_controls = {}, []   # controls: (method, option spec, component)
                for method in METHODS.values():
                    main = [spec for spec in method.options() if spec["main"]]
                    with gr.Group(visible=method.name == FIRST_METHOD) as page.method_groups[method.name]:
                        gr.Markdown(f"**{method.label}** trains {method.trains}.")
                        page.method_controls.extend((method.name, spec, control(spec)) for spec in main)
                page.options = gr.JSON(visible=False)   # the chosen method's options, as /tune takes them
            with gr.Column(scale=1):
                page.shots = number_field(gr.Number(16, precision=0, minimum=0, label="Shots (training items; 0 = all)"))
                page.epochs = number_field(gr.Slider(1, 50, value=10, step=1, label="Epochs"))
                page.lr = number_field(gr.Number(
                    None, minimum=0, label="Learning rate (empty or 0: found on your data)",
                    info="a short range test on your training data picks it, and the result shows the loss it "
                         "measured; a rate typed in is used as given"))
                page.batch_size = number_field(gr.Slider(2, 128, value=16, step=1, label="Batch size"))
                page.frames = number_field(gr.Slider(1, 16, value=DEFAULT_FRAMES, step=1, label="Frames per video"))
                page.answers = gr.Textbox(label="VQA: extra candidate answers, comma-separated")
                page.precision = gr.Radio(list(PRECISIONS), value="auto", label="Training precision",
                                          info=f"auto: bf16 where the hardware computes it natively, fp16 on other "
                                               f"GPUs, fp32 elsewhere (here: {_auto_precision()})")
                with gr.Row():
                    page.start = gr.Button("Start tuning", variant="primary")
                    page.cancel = gr.Button("Cancel", variant="stop")
                page.estimate = gr.Markdown(NO_ESTIMATE)
                page.status = gr.Markdown(elem_classes="petstudio-status")
        with gr.Row():
            page.card = gr.Markdown()
            page.loss_plot = gr.Plot(label="Loss")
        page.weights_out = gr.File(label="Tuned PET weights (pet.safetensors + run.json)", file_count="multiple",
                                   interactive=False)
        page.timer = gr.Timer(1.0, active=False)


def _auto_precision() -> str:
    # On ZeroGPU this process has no GPU to ask (CUDA exists only inside a GPU call): the H200's is bf16.
    return "bf16, on the Space's GPU" if ZERO_GPU else autocast_for("auto", pick_device()) or "fp32"


def wire(page) -> None:
    page.model.change(model_notice, [page.model], [page.model_note], api_name="model_notice", queue=False)
    groups = list(page.method_groups.values())
    # The authors' recipe sets the options: their knobs are hidden then.
    for source, api_name in ((page.method, "method_options"), (page.recipe, "recipe_options")):
        source.change(lambda method, recipe: [*(gr.update(visible=name == method and recipe == "studio")
                                                for name in page.method_groups),
                                              gr.update(visible=recipe != "studio")],
                      [page.method, page.recipe], [*groups, page.recipe_note], api_name=api_name, queue=False)
    controls = page.method_controls

    def options_of(method: str, recipe: str, *values) -> dict[str, Any]:
        return {} if recipe != "studio" else options_by_method(controls, list(values)).get(method, {})

    inputs = [page.model, page.task, page.method, page.options, page.shots, page.epochs, page.lr, page.batch_size,
              page.precision, page.answers, page.frames, page.recipe]
    (page.start.click(start_tuning, None, [page.timer], api_name="start_live", queue=False)
     .then(options_of, [page.method, page.recipe, *(c for *_, c in controls)], [page.options],
           api_name="options_of", queue=False)
     .then(tune_model, inputs, [page.card, page.loss_plot, page.weights_out, page.ask_run, page.inspect_run,
                                page.status], api_name="tune",
           concurrency_limit=TUNING_CONCURRENCY, concurrency_id="tuning")
     .then(lambda: gr.Timer(active=False), None, [page.timer], api_name="stop_live", queue=False)
     .then(compare_runs, None, [page.table, page.compare_plot], api_name="compare_after_tune"))
    page.cancel.click(cancel_tuning, None, [page.status], api_name="cancel", queue=False)
    planned = [page.model, page.task, page.method, page.shots, page.epochs, page.batch_size]
    for source, api_name in ((page.stats, "estimate_for_data"), (page.model, "estimate_for_model"),
                             (page.task, "estimate_for_task"), (page.method, "estimate_for_method"),
                             (page.shots, "estimate_for_shots"), (page.epochs, "estimate_for_epochs"),
                             (page.batch_size, "estimate_for_batch_size")):
        source.change(tuning_estimate, planned, [page.estimate], api_name=api_name, queue=False)
    page.timer.tick(live_progress, None, [page.loss_plot, page.status], api_name="live_progress",
                    concurrency_limit=None, show_progress="hidden")


def start_tuning(request: gr.Request):
    session_of(request).live_status = "starting…"
    return gr.Timer(active=True)


def _step_text(step: dict) -> str:
    return f"step {step['step']}/{step['total_steps']} · epoch {step['epoch']} · loss {step['loss']:.4f} · " \
           f"ETA {step['eta']:.0f} s"


def _training(session: Session) -> bool:
    """A tuning is running and not being cancelled: its steps are the news."""
    return session.tuning and session.live is not None and not (session.live / CANCEL_FILE).exists()


def tune_model(model: str, task: str, method: str, options: Optional[dict], shots: float, epochs: float,
               lr: Optional[float], batch_size: float, precision: str, answers: str, frames: float,
               recipe: str, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
    """Tune `method` with its `options` (a JSON object of option: value; the rest keep the
    recipe's, then the defaults) from `recipe` (studio or authors) on the session's dataset;
    returns the before/after card, the training figure, the weights to download, the updated run
    lists and the status line."""
    session = session_of(request)
    spec = spec_of(model)
    arguments = dict(model=spec, method=method, options=options or {}, shots=whole(shots, "shots") or None,
                     epochs=whole(epochs, "epochs"), batch_size=whole(batch_size, "batch size"), precision=precision,
                     task=task, frames=whole(frames, "frames"), epoch_metrics=True, local_paths=LOCAL_PATHS,
                     recipe=recipe, budget=MODELS.weights_budget,
                     zero_shot_cache=ScoreCache(session.folder / "zero-shot"),
                     lr_cache=ChoiceCache(session.folder / "lr-range"),
                     extra_answers=tuple(a.strip() for a in str(answers or "").split(",") if a.strip()))
    # the browser sends an emptied field as 0 (it is the field's minimum): both mean "found on your data"
    arguments["lr"] = number(lr, "learning rate") or "auto"
    try:   # refused before any folder or device time is taken
        check_settings(**{k: arguments[k] for k in ("shots", "epochs", "lr", "batch_size", "frames", "extra_answers")})
        get_method(method)   # an API client's unknown method
        make_config(method, arguments["options"])   # its unknown option, a value out of range
        MODELS.refuse_oversized(spec)
    except USER_ERRORS as error:
        raise views.user_error(error) from error
    live, out, data = claim_folders(session, "runs", str(method))
    session.live_status = "loading the model and scoring it zero-shot…"
    progress(0, desc="loading the model and scoring it zero-shot")

    def show_step() -> None:
        steps = training_steps(live) if _training(session) else []
        if steps:
            progress((steps[-1]["step"], steps[-1]["total_steps"]), unit="steps", desc=_step_text(steps[-1]))

    arguments.update(data=data, out=out)
    try:
        seconds, _ = planned_seconds(session.dataset, spec, task, method, arguments["shots"], arguments["epochs"],
                                     arguments["batch_size"])
        result = run_polling(on_device, show_step, tune_on_device, str(live), len(session.dataset.split("test")),
                             arguments, seconds=seconds)
    except Exception as error:
        STORE.remove(out)
        session.live_status = f"stopped: {error}"
        if isinstance(error, USER_ERRORS):
            raise views.user_error(error) from error
        raise
    finally:
        session.tuning = False
    if request.session_hash not in STORE:   # the page was closed meanwhile: leave nothing behind
        STORE.remove(session.folder)
        raise gr.Error("this page's session was closed while it was tuning")
    steps = result.train.steps_run or len(result.train.step_losses)
    if result.train.seconds and steps:
        record_step_time(result.backbone, method, arguments["batch_size"], result.train.seconds / steps)
    name = f"{len(session.runs) + 1} · {method} · {result.backbone}"
    session.runs[name] = Run(name, out, result, local_paths=LOCAL_PATHS)
    cancelled = " (cancelled early)" if result.train.cancelled else ""
    session.live_status = f"done in {result.seconds:.0f} s{cancelled}"
    if result.note:
        gr.Warning(result.note)
    return (views.run_card(name, result), figures.training_figure(result), views.weights_files(out),
            *run_choices(session, name), session.live_status)


def tuning_estimate(model: str, task: str, method: str, shots: float, epochs: float, batch_size: float,
                    request: gr.Request) -> str:
    """How long a tuning with these settings takes on the session's dataset, said before Start."""
    session = session_of(request)
    if session.dataset is None:
        return NO_ESTIMATE
    try:
        get_method(method)   # an API client's unknown method
        seconds, steps = planned_seconds(session.dataset, spec_of(model), task, method,
                                         whole(shots, "shots") or None, whole(epochs, "epochs"),
                                         whole(batch_size, "batch size") or 1)
    except gr.Error as error:
        return f"*{error.message}*"
    except USER_ERRORS as error:   # an unknown method, from an API client
        return f"*{error}*"
    if not ZERO_GPU:
        return f"About {steps} training steps: roughly {seconds:.0f} s here."
    cut = (f" That is short of the ~{seconds:.0f} s it would take: training stops in time to score and save what "
           f"it learned, and says so.") if seconds > GPU_SECONDS else ""
    return (f"About {steps} training steps: asks the GPU for ~{granted_seconds(seconds)} s of your daily ZeroGPU "
            f"quota (at most {GPU_SECONDS} s).{cut}")


def cancel_tuning(request: gr.Request) -> str:
    return request_cancel(session_of(request))


def live_progress(request: gr.Request):
    """The loss so far and a status line: the latest step while training, else what happened last."""
    session = session_of(request)
    steps = training_steps(session.live) if session.live else []
    status = _step_text(steps[-1]) if steps and _training(session) else session.live_status
    return figures.training_figure(None, live=[step["loss"] for step in steps]), status


def model_notice(model: str) -> str:
    """Where the chosen backbone's weights come from, said before anything is tuned."""
    return describe_spec(spec_of(model), LOCAL_PATHS)
