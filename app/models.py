"""The models a query runs on, shared by the Ask and Inspect tabs: the frozen backbone (one per
spec and seed for the whole process: a query never changes it), a session's tuned runs (its
own), and each model's embeddings of the session's gallery, computed once per model state."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import gradio as gr

from app.sessions import FROZEN_MODELS_KEPT, Run, Session, SharedModels
from core import query
from core.backbones import load_backbone
from core.data.media import DEFAULT_FRAMES
from core.runs import load_run
from core.trainer import pick_device

FROZEN = SharedModels(FROZEN_MODELS_KEPT)
# Typed backbone specs may name files and folders on the server only where its operator allows it
# (a local app); runs uploaded by a visitor never may.
LOCAL_PATHS = os.environ.get("PETSTUDIO_LOCAL_PATHS", "") == "1"
NO_RUN = "frozen model only"


def spec_of(model) -> str:
    """A backbone spec as the page or an API client sent it (the dropdown takes typed values)."""
    if model is None or (isinstance(model, str) and not model.strip()):
        return "offline"
    if not isinstance(model, str):
        raise gr.Error(f"the backbone must be a spec like offline or openclip:NAME:TAG, not {model!r:.60}")
    return model.strip()


def frozen(session: Session, spec: str, seed: int, local_paths: bool) -> str:
    key = f"frozen:{spec}:{seed}"
    session.model(key, lambda: (FROZEN.get((spec, seed, local_paths), lambda: load_backbone(
        spec, seed, fallback_offline=True, local_paths=local_paths).to(pick_device())), None))
    return key


def load_tuned(run: Run):
    """A run's backbone with its PET weights (every name, shape, dtype and value checked), merged
    for zero-overhead inference where the method is linear in the weights."""
    backbone, handle, _ = load_run(run.result.backbone, run.folder, local_paths=run.local_paths)
    if handle.mergeable:
        handle.merge()
    return backbone, handle


def run_key(run: Run) -> str:
    return f"run:{run.name}"


def tuned(session: Session, run: Run) -> str:
    session.model(run_key(run), lambda: load_tuned(run))
    return run_key(run)


def models_for(session: Session, run_name: str, model) -> list[tuple[str, str]]:
    """(label, model key) of the frozen model and, when a run is chosen, the tuned one."""
    run = session.runs.get(run_name) if isinstance(run_name, str) else None
    spec = run.result.backbone if run else spec_of(model)
    keys = [("frozen", frozen(session, spec, run.result.seed if run else 0,
                              run.local_paths if run else LOCAL_PATHS))]
    if run:
        keys.append((f"tuned ({run.name})", tuned(session, run)))
    return keys


def frames_for(session: Session, run_name: str) -> int:
    """Frames per video: as the chosen run was tuned with."""
    run = session.runs.get(run_name) if isinstance(run_name, str) else None
    return run.result.frames if run else DEFAULT_FRAMES


def gallery(session: Session, key: str, frames: int):
    """The dataset's gallery and its embeddings under one model state, computed once."""
    if session.dataset is None:
        raise gr.Error("load a dataset first (Data tab)")
    cache = (key, session.dataset.root, frames)
    if cache not in session.galleries:
        backbone = session.models[key][0]
        items = query.load_gallery(backbone, session.dataset, frames)
        session.galleries[cache] = (items, query.embed_gallery(backbone, items))
    return session.galleries[cache]


def media_path(session: Session, upload: Optional[str], pick: Optional[str]) -> Path:
    """The query's picture or clip: an uploaded file, or one the dataset holds."""
    if upload:
        return Path(upload)
    if session.dataset is not None and pick:
        for item in session.dataset.items:
            if item.media == pick:
                return session.dataset.path(item)
    raise gr.Error("upload a picture or clip, or pick one of the dataset's")


def run_choices(session: Session, selected: Optional[str]) -> tuple:
    """The run pickers of the Ask and Inspect tabs: this session's runs, `selected` chosen."""
    choices = [NO_RUN, *session.runs]
    value = selected if selected in session.runs else (choices[-1] if session.runs else NO_RUN)
    return gr.update(choices=choices, value=value), gr.update(choices=choices, value=value)
