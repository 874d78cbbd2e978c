"""The Ask tab's weights panel: a run's pet.safetensors and run.json downloaded, or such a pair
loaded back as a run of this session — checked whole (run.json's schema, every tensor's name,
shape, dtype and value), and never allowed to name a file or folder on the server."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import gradio as gr

from app import views
from app.device import Call, on_device, query_seconds
from app.models import MODELS, ModelKey, run_choices, run_model
from app.sessions import STORE, Run, session_of
from app.tabs.compare import compare_runs
from core import checkpoint
from core.runs import USER_ERRORS


def layout(page) -> None:
    with gr.Accordion("Tuned weights: download, or load saved ones", open=False):
        with gr.Row():
            page.download = gr.Button("Download the chosen run's weights")
            page.downloaded = gr.File(label="Weights", file_count="multiple", interactive=False)
        with gr.Row():
            page.weights_in = gr.File(label="pet.safetensors and run.json", file_count="multiple",
                                      file_types=[".safetensors", ".json"])
            page.load_weights = gr.Button("Load weights")
        page.loaded = gr.Markdown()


def wire(page) -> None:
    page.download.click(download_weights, [page.ask_run], [page.downloaded], api_name="download_weights")
    page.load_weights.click(load_weights, [page.weights_in], [page.loaded, page.ask_run, page.inspect_run],
                            api_name="load_weights", concurrency_id="inference").then(
        compare_runs, None, [page.table, page.compare_plot], api_name="compare_after_load")


def download_weights(run: str, request: gr.Request) -> list[str]:
    session = session_of(request)
    if not isinstance(run, str) or run not in session.runs:
        raise gr.Error("choose one of this session's runs")
    return views.weights_files(session.runs[run].folder)


def _attach_on(call: Call, key: ModelKey) -> None:
    with MODELS.on(call, key):
        pass


def _as_uploaded(message: str, folder: Path, weights: str, info: str) -> str:
    """A refusal said of the files as the user named them, not of the server's copies in `folder`."""
    message = message.replace(str(folder / checkpoint.RUN_INFO), info).replace(str(folder / checkpoint.WEIGHTS), weights)
    return weights + message[len(checkpoint.WEIGHTS):] if message.startswith(f"{checkpoint.WEIGHTS}:") else message


def load_weights(files: Optional[list[str]], request: gr.Request):
    """Tuned weights back into this session: a pet.safetensors (safetensors only) with its run.json."""
    session = session_of(request)
    paths = [Path(f) for f in files or []]
    weights = [p for p in paths if p.suffix == ".safetensors"]
    infos = [p for p in paths if p.suffix == ".json"]
    others = [p.name for p in paths if p not in weights and p not in infos]
    if others:
        raise gr.Error(f"{', '.join(others)}: only a .safetensors weights file and its run.json are loaded")
    if len(weights) != 1 or len(infos) != 1:
        raise gr.Error("upload exactly two files: the weights (.safetensors) and the run.json saved with them")
    with session.lock:
        folder = session.new_folder("runs", "uploaded")
        shutil.copyfile(weights[0], folder / checkpoint.WEIGHTS)
        shutil.copyfile(infos[0], folder / checkpoint.RUN_INFO)
        loaded, refusal = None, None
        try:
            info, _ = checkpoint.read(folder)   # run.json checked against its schema
            run = Run(f"{len(session.runs) + 1} · {info.method} · {info.backbone} (uploaded)", folder, info,
                      local_paths=False)
            # every name, shape, dtype and value is checked before the run is listed, by attaching it to the
            # shared backbone: inside a device call, so that no ZeroGPU worker is forked from a half-attached model
            loaded = MODELS.load([run_model(run)])
            on_device(_attach_on, run_model(run), seconds=query_seconds(info.backbone, 0))
        except (*USER_ERRORS, gr.Error) as error:   # gr.Error: the same, said inside the device call
            STORE.remove(folder)
            said = error.message if isinstance(error, gr.Error) else str(error)
            refusal = _as_uploaded(said, folder, weights[0].name, infos[0].name)
        if refusal is not None:
            # a refused file keeps no model it made the app build; out here, where no traceback holds it
            if loaded is not None:
                MODELS.forget(loaded)
            raise views.user_error(ValueError(refusal))
        session.runs[run.name] = run
    card = views.run_card(run.name, info) if info.scored else f"Loaded **{views.plain(run.name)}**."
    return card, *run_choices(session, run.name)
