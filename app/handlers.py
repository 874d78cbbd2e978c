"""Event handlers: each takes the page's values and the request, calls core, and returns what
the page shows. User errors come back as gr.Error with core's message (file and row included)."""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from app import views
from app.tuning import CANCEL_FILE, read_progress, tune_on_device
from app.sessions import FROZEN_MODELS_KEPT, Run, Session, SessionStore, SharedModels
from core import checkpoint, figures, query
from core.backbones import BackboneError, load_backbone, parse_spec
from core.data import DatasetError, read_dataset
from core.data.media import DEFAULT_FRAMES
from core.data.samples import sample_path
from core.pet import make_config
from core.runs import USER_ERRORS, load_run, suggested_lr
from core.trainer import pick_device
from core.world import write_part

STORE = SessionStore()
# Frozen backbones are never changed by a query, so every session shares one per spec and seed.
FROZEN = SharedModels(FROZEN_MODELS_KEPT)
# Typed backbone specs may name files and folders on the server only where its operator allows it
# (a local app); runs uploaded by a visitor never may.
LOCAL_PATHS = os.environ.get("PETSTUDIO_LOCAL_PATHS", "") == "1"
WORLD_ITEMS = {"novel-motion": 24}   # clips take longer to write and decode than pictures
WORLD_PICTURES = 64

DATASETS = {
    "Offline world: novel colours (image-text, VQA)": ("world", "novel-colours"),
    "Photos: 8 photographs with captions and questions (image-text, VQA)": ("sample", "photos"),
    "Clips: 6 short videos with captions and questions (video-text, VQA)": ("sample", "clips"),
    "Offline world: novel compositions (image-text, VQA)": ("world", "novel-compositions"),
    "Offline world: novel textures (image-text, VQA)": ("world", "novel-textures"),
    "Offline world: novel motion (video-text, VQA)": ("world", "novel-motion"),
    "Offline world: base scenes, as pretrained (image-text, VQA)": ("world", "base"),
}
BACKBONES = [
    ("Offline model (bundled, works with no network)", "offline"),
    ("open_clip ViT-B-32 · openai", "openclip:ViT-B-32:openai"),
    ("open_clip ViT-B-16 · laion2b_s34b_b88k", "openclip:ViT-B-16:laion2b_s34b_b88k"),
    ("BLIP base retrieval · Salesforce/blip-itm-base-coco", "blip:Salesforce/blip-itm-base-coco"),
    ("BLIP base VQA · Salesforce/blip-vqa-base", "blip-vqa:Salesforce/blip-vqa-base"),
    ("PETStudio-Tiny (random init, for trying things out)", "openclip:PETStudio-Tiny"),
]
METHOD_LABELS = [("Aurora (mode approximation)", "aurora"), ("VL-PET (gates)", "vlpet"), ("LoRA", "lora"),
                 ("Bottleneck adapter", "adapter"), ("Deep prompt tuning", "prompt"), ("BitFit", "bitfit"),
                 ("Linear probe", "linear_probe"), ("Full fine-tuning", "full"), ("Zero-shot (no tuning)", "zero_shot")]
PREVIEW_LIMIT = 48
NO_RUN = "frozen model only"


def session_of(request: gr.Request) -> Session:
    return STORE.get(request.session_hash)


def release(request: gr.Request) -> None:
    STORE.release(request.session_hash)


def _spec(model) -> str:
    """A backbone spec as the page or an API client sent it (the dropdown takes typed values)."""
    if model is None or (isinstance(model, str) and not model.strip()):
        return "offline"
    if not isinstance(model, str):
        raise gr.Error(f"the backbone must be a spec like offline or openclip:NAME:TAG, not {model!r:.60}")
    return model.strip()


def _user_error(error: Exception) -> gr.Error:
    return gr.Error(str(error), duration=None)


# --- Data -------------------------------------------------------------------------------------

def _media_choices(session: Session) -> list[str]:
    return [item.media for item in session.dataset.items] if session.dataset else []


def _open_dataset(session: Session, source: Path, label: str, made: Optional[Path] = None):
    """Read and validate `source` into a fresh folder of the session; show it, or the report.
    `made` is a folder this upload wrote `source` into: it goes too when the dataset is refused."""
    with session.lock:
        workdir = session.new_folder("data", label)
        try:
            dataset = read_dataset(source, workdir)
        except BaseException as error:
            for folder in (workdir, made):
                if folder is not None:
                    STORE.remove(folder)
            if not isinstance(error, DatasetError):
                raise
            gr.Warning(f"{label}: {len(error.problems)} problem(s), see the validation report")
            kept = f"Still loaded: {views.dataset_stats(session.dataset_label, session.dataset)}" \
                if session.dataset is not None else ""
            return [], kept, views.validation_report(error.problems), *_media_updates(session)
        if not session.tuning:   # one dataset at a time per session: earlier ones go
            for old in (f for kind in ("data", "world", "uploads") for f in session.folder.glob(f"{kind}/*")):
                if old != workdir and not source.is_relative_to(old):
                    STORE.remove(old)
        session.dataset, session.dataset_label = dataset, label
        session.galleries.clear()
        preview = [(str(dataset.path(item)), views.preview_caption(item)) for item in dataset.items[:PREVIEW_LIMIT]]
        return (preview, views.dataset_stats(label, dataset), views.validation_report([]),
                *_media_updates(session))


def _media_updates(session: Session) -> tuple:
    choices = _media_choices(session)
    value = choices[0] if choices else None
    return gr.update(choices=choices, value=value), gr.update(choices=choices, value=value)


def load_sample(choice: str, request: gr.Request):
    """A bundled set: the sample photos or clips, or a part of the offline world written for this session."""
    session = session_of(request)
    if choice not in DATASETS:
        raise gr.Error(f"unknown sample set '{choice}': choose one of {', '.join(DATASETS)}")
    kind, name = DATASETS[choice]
    if kind == "sample":
        return _open_dataset(session, sample_path(name), name)
    folder = session.new_folder("world", name)
    write_part(folder, name, WORLD_ITEMS.get(name, WORLD_PICTURES))
    return _open_dataset(session, folder, f"world-{name}", made=folder)


def upload_data(files: Optional[list[str]], request: gr.Request):
    """A .zip of a dataset folder, or the manifest and media files themselves."""
    session = session_of(request)
    if not files:
        raise gr.Error("choose a .zip or the files of a dataset (captions.csv or data.jsonl and its media)")
    paths = [Path(f) for f in files]
    if len(paths) == 1 and paths[0].suffix.lower() == ".zip":
        return _open_dataset(session, paths[0], paths[0].stem)
    zips = [p.name for p in paths if p.suffix.lower() == ".zip"]
    if zips:
        raise gr.Error(f"{', '.join(zips)}: upload a .zip on its own, not with other files")
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        raise gr.Error("two of the uploaded files have the same name: upload a .zip of the dataset folder instead")
    folder = session.new_folder("uploads", "files")
    for path in paths:
        shutil.copyfile(path, folder / path.name)
    return _open_dataset(session, folder, "uploaded files", made=folder)


# --- Tune -------------------------------------------------------------------------------------

def method_options(method: str, aurora_rank: float, aurora_parts: list[str], lora_rank: float,
                   granularity: str, reduction: float, prompt_length: float) -> dict[str, Any]:
    """The main knobs of `method` as core options; every other option keeps its default."""
    if method == "aurora":
        return {"rank": int(aurora_rank), **{part: part in aurora_parts for part in ("gqt", "ice", "heads")}}
    if method == "lora":
        return {"rank": int(lora_rank)}
    if method == "vlpet":
        return {"granularity": granularity, "reduction": int(reduction)}
    if method == "adapter":
        return {"reduction": int(reduction)}
    if method == "prompt":
        return {"length": int(prompt_length)}
    return {}


def show_method_options(method: str):
    """Which knobs the chosen method has: aurora, lora, vlpet+adapter (reduction), vlpet, prompt."""
    return (gr.update(visible=method == "aurora"), gr.update(visible=method == "lora"),
            gr.update(visible=method == "vlpet"), gr.update(visible=method in ("vlpet", "adapter")),
            gr.update(visible=method == "prompt"))


def _run_choices(session: Session, selected: Optional[str]) -> tuple:
    choices = [NO_RUN, *session.runs]
    value = selected if selected in session.runs else (choices[-1] if session.runs else NO_RUN)
    return gr.update(choices=choices, value=value), gr.update(choices=choices, value=value)


def start_tuning(request: gr.Request):
    session_of(request).live_status = "starting…"
    return gr.Timer(active=True)


def _step_text(step: dict) -> str:
    return f"step {step['step']}/{step['total_steps']} · epoch {step['epoch']} · loss {step['loss']:.4f} · " \
           f"ETA {step['eta']:.0f} s"


def _training(session: Session) -> bool:
    """A tuning is running and not being cancelled: its steps are the news."""
    return session.tuning and session.live is not None and not (session.live / CANCEL_FILE).exists()


def tune_model(model: str, task: str, method: str, aurora_rank: float, aurora_parts: list[str], lora_rank: float,
               granularity: str, reduction: float, prompt_length: float, shots: float, epochs: float,
               lr: Optional[float], batch_size: float, bf16: bool, answers: str, frames: float,
               request: gr.Request, progress=gr.Progress(track_tqdm=True)):
    """Tune on the session's dataset; returns the before/after card, the training figure, the
    weights to download, the updated run lists and the status line."""
    session = session_of(request)
    if session.dataset is None:
        raise gr.Error("load a dataset first (Data tab)")
    if session.live is not None and not session.tuning:   # the previous tuning's progress is not shown again
        STORE.remove(session.live)
    session.live = live = session.new_folder("live", method)
    session.live_status = "loading the model and scoring it zero-shot…"
    progress(0, desc="loading the model and scoring it zero-shot")
    out = session.new_folder("runs", method)
    session.tuning = True
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            job = pool.submit(
                tune_on_device, str(live), model=_spec(model), data=session.dataset.root, method=method,
                options=method_options(method, aurora_rank, aurora_parts, lora_rank, granularity, reduction,
                                       prompt_length),
                shots=int(shots) if shots else None, epochs=int(epochs), lr=float(lr) if lr else None,
                batch_size=int(batch_size), bf16=bool(bf16), task=task, frames=int(frames),
                extra_answers=tuple(a.strip() for a in (answers or "").split(",") if a.strip()),
                out=out, epoch_metrics=True, local_paths=LOCAL_PATHS)
            while not wait([job], timeout=0.5).done:
                steps = read_progress(live) if _training(session) else []
                if steps:
                    last = steps[-1]
                    progress((last["step"], last["total_steps"]), unit="steps", desc=_step_text(last))
            result = job.result()
    except Exception as error:
        STORE.remove(out)
        session.live_status = f"stopped: {error}"
        if isinstance(error, USER_ERRORS):
            raise _user_error(error) from error
        raise
    finally:
        session.tuning = False
    if request.session_hash not in STORE:   # the page was closed meanwhile: leave nothing behind
        STORE.remove(session.folder)
    name = f"{len(session.runs) + 1} · {method} · {result['backbone']}"
    session.runs[name] = Run(name, out, result, local_paths=LOCAL_PATHS)
    cancelled = " (cancelled early)" if result["train"]["cancelled"] else ""
    session.live_status = f"done in {result['seconds']:.0f} s{cancelled}"
    if result["note"]:
        gr.Warning(result["note"])
    return (views.run_card(name, result), figures.training_figure(result), _weights_files(out),
            *_run_choices(session, name), session.live_status)


def cancel_tuning(request: gr.Request) -> str:
    session = session_of(request)
    if session.live is None or not session.tuning:
        return "nothing is tuning"
    (session.live / CANCEL_FILE).touch()
    session.live_status = "cancelling after the current step…"
    return session.live_status


def live_progress(request: gr.Request):
    """The loss so far and a status line: the latest step while training, else what happened last."""
    session = session_of(request)
    steps = read_progress(session.live) if session.live else []
    status = session.live_status
    if steps and _training(session):
        status = _step_text(steps[-1])
    return figures.training_figure({}, live=[step["loss"] for step in steps]), status


def stop_live():
    return gr.Timer(active=False)


def suggest_lr(model: str, method: str) -> float:
    return suggested_lr(_spec(model), method)


def model_notice(model: str) -> str:
    """Where the chosen backbone's weights come from, said before anything is tuned (from the
    spec's form alone: nothing on the server is looked at)."""
    try:
        spec = parse_spec(model)
    except BackboneError as error:
        return str(error)
    if spec.weights == "bundled":
        return "The bundled offline model: small, pretrained on PET Studio's procedural world, no network needed."
    if spec.weights == "path":
        return (f"`{spec.text}`: weights from a local path." if LOCAL_PATHS else
                f"`{spec.text}` names a file or folder on the server, which this app does not open "
                f"(its operator can allow it with PETSTUDIO_LOCAL_PATHS=1).")
    if spec.weights == "random":
        return (f"`{spec.text}` has no pretrained weights: random init from the seed "
                f"(for trying the mechanics, not quality).")
    return (f"`{spec.text}` downloads its weights on first use. Without a network the run falls back to the bundled "
            f"offline model and says so here.")


# --- Weights ----------------------------------------------------------------------------------

def _weights_files(folder: Path) -> list[str]:
    return [str(folder / checkpoint.WEIGHTS), str(folder / checkpoint.RUN_INFO)]


def download_weights(run: str, request: gr.Request) -> list[str]:
    session = session_of(request)
    if run not in session.runs:
        raise gr.Error("choose one of this session's runs")
    return _weights_files(session.runs[run].folder)


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
        try:
            info, _ = checkpoint.read(folder)   # run.json checked against its schema
            run = Run(f"{len(session.runs) + 1} · {info['method']} · {info['backbone']} (uploaded)", folder, info,
                      local_paths=False)
            loaded = _load_tuned(run)   # every name, shape, dtype and value is checked before the run is listed
        except USER_ERRORS as error:
            STORE.remove(folder)
            raise _user_error(error) from error
        session.runs[run.name] = run
        session.model(_run_key(run), lambda: loaded)
    name = run.name
    card = views.run_card(name, info) if "tuned" in info else f"Loaded **{name}**."
    return card, *_run_choices(session, name)


# --- Ask --------------------------------------------------------------------------------------

def _frozen(session: Session, spec: str, seed: int, local_paths: bool) -> str:
    key = f"frozen:{spec}:{seed}"
    session.model(key, lambda: (FROZEN.get((spec, seed, local_paths), lambda: load_backbone(
        spec, seed, fallback_offline=True, local_paths=local_paths).to(pick_device())), None))
    return key


def _load_tuned(run: Run):
    backbone, handle, _ = load_run(run.result["backbone"], run.folder, local_paths=run.local_paths)
    if handle.mergeable:
        handle.merge()   # zero-overhead inference
    return backbone, handle


def _run_key(run: Run) -> str:
    return f"run:{run.name}"


def _tuned(session: Session, run: Run) -> str:
    session.model(_run_key(run), lambda: _load_tuned(run))
    return _run_key(run)


def _models(session: Session, run_name: str, model: str) -> list[tuple[str, str]]:
    """(label, model key) of the frozen model and, when a run is chosen, the tuned one."""
    run = session.runs.get(run_name)
    spec = run.result["backbone"] if run else _spec(model)
    keys = [("frozen", _frozen(session, spec, run.result.get("seed", 0) if run else 0,
                               run.local_paths if run else LOCAL_PATHS))]
    if run:
        keys.append((f"tuned ({run.name})", _tuned(session, run)))
    return keys


def _frames(session: Session, run_name: str) -> int:
    """Frames per video: as the chosen run was tuned with."""
    run = session.runs.get(run_name)
    return run.result.get("frames", DEFAULT_FRAMES) if run else DEFAULT_FRAMES


def _gallery(session: Session, key: str, frames: int):
    """The dataset's gallery and its embeddings under one model state, computed once."""
    if session.dataset is None:
        raise gr.Error("load a dataset first (Data tab)")
    cache = (key, session.dataset.root, frames)
    if cache not in session.galleries:
        backbone = session.models[key][0]
        gallery = query.load_gallery(backbone, session.dataset, frames)
        session.galleries[cache] = (gallery, query.embed_gallery(backbone, gallery))
    return session.galleries[cache]


def _query_media(session: Session, upload: Optional[str], pick: Optional[str]) -> Path:
    if upload:
        return Path(upload)
    if session.dataset is not None and pick:
        for item in session.dataset.items:
            if item.media == pick:
                return session.dataset.path(item)
    raise gr.Error("upload a picture or clip, or pick one of the dataset's")


def _pad(results: list, empty) -> list:
    return results + [empty] * (2 - len(results))


def search_text(text: str, run: str, model: str, request: gr.Request):
    """Text → media over the dataset's gallery, frozen and tuned side by side."""
    session = session_of(request)
    with session.lock:
        try:
            shown, notes = [], set()
            for label, key in _models(session, run, model):
                gallery, embeddings = _gallery(session, key, _frames(session, run))
                found = query.search_by_text(session.models[key][0], gallery, embeddings, text)
                notes |= {found.note} - {None}
                shown.append([(str(gallery.paths[h.index]), f"{h.score:.3f} · {gallery.names[h.index]}")
                              for h in found.hits])
        except (query.QueryError, *USER_ERRORS) as error:
            raise _user_error(error) from error
    for note in notes:
        gr.Warning(note)
    return tuple(_pad(shown, []))


def search_media(upload: Optional[str], pick: Optional[str], run: str, model: str, request: gr.Request):
    """Picture or clip → the dataset's captions, frozen and tuned side by side."""
    session = session_of(request)
    with session.lock:
        path = _query_media(session, upload, pick)
        try:
            shown = []
            for label, key in _models(session, run, model):
                frames = _frames(session, run)
                gallery, embeddings = _gallery(session, key, frames)
                hits = query.search_by_media(session.models[key][0], gallery, embeddings, path, frames=frames).hits
                shown.append([[i + 1, round(h.score, 4), gallery.names[gallery.caption_media[h.index]],
                               gallery.captions[h.index]] for i, h in enumerate(hits)])
        except (query.QueryError, *USER_ERRORS) as error:
            raise _user_error(error) from error
    return tuple(_pad(shown, None))


def answer_question(upload: Optional[str], pick: Optional[str], question: str, answers: str, run: str, model: str,
                    request: gr.Request):
    """VQA: candidate answers ranked (and generated, on BLIP VQA), frozen and tuned side by side."""
    session = session_of(request)
    with session.lock:
        path = _query_media(session, upload, pick)
        candidates = [a.strip() for a in (answers or "").split(",") if a.strip()]
        if session.dataset is not None:
            candidates += [a for item in session.dataset.items for qa in item.qa for a in qa.answers]
        try:
            labels, generated, notes = [], [], set()
            for label, key in _models(session, run, model):
                result = query.answer(session.models[key][0], path, question, candidates,
                                      frames=_frames(session, run))
                labels.append({a: p for a, p in result.ranked} or None)
                notes |= {result.note} - {None}
                if result.generated is not None:
                    generated.append(f"**{label}** generates: “{result.generated}”")
        except (query.QueryError, *USER_ERRORS) as error:
            raise _user_error(error) from error
    for note in notes:
        gr.Warning(note)
    return (*_pad(labels, None), "\n\n".join([*(f"> **Note:** {n}" for n in sorted(notes)), *generated]))


# --- Inspect ----------------------------------------------------------------------------------

def inspect_run(run: str, pick: Optional[str], request: gr.Request):
    """The run's budget, its gates (on the picked picture for per-token gates) and its training curves."""
    session = session_of(request)
    if run not in session.runs:
        raise gr.Error("choose one of this session's runs (tune one, or load weights)")
    with session.lock:
        chosen = session.runs[run]
        result = chosen.result
        try:
            _, handle = session.models[_tuned(session, chosen)]
            path = _query_media(session, None, pick) if session.dataset is not None and pick else None
            caption = next((i.captions[0] for i in session.dataset.items if i.media == pick and i.captions), None) \
                if path else None
            view = query.read_gates(handle, path, caption or "a photo")
        except (query.QueryError, *USER_ERRORS) as error:
            raise _user_error(error) from error
        budget = figures.budget_figure(handle.budget(), handle.backbone.num_backbone_params(),
                                       (chosen.folder / checkpoint.WEIGHTS).stat().st_size)
    gates = figures.gate_figure(result["method"], make_config(result["method"], result["config"]), view.readout)
    overlay = (figures.patch_overlay_figure(view.picture, view.patch_map, f"vision gates over {pick} "
                                            f"(mean over layers and sub-layers)")
               if view.patch_map is not None else
               figures.message_figure("Per-token gates (VL-PET middleX or large) are drawn over the picture here."))
    return budget, gates, overlay, figures.training_figure(result)


# --- Compare ----------------------------------------------------------------------------------

def compare_runs(request: gr.Request):
    session = session_of(request)
    runs = [r for r in session.runs.values() if "tuned" in r.result]
    rows = [views.compare_row(r.name, r.result, r.folder) for r in runs]
    return rows or None, \
        figures.compare_figure([r.result for r in runs])
