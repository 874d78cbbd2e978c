"""Data: a bundled set (the offline world's parts, the sample photos and clips) or an upload,
shown as a preview with its statistics and validation report (every problem with file and row)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import gradio as gr

from app import views
from app.sessions import STORE, Session, session_of
from core.data import DatasetError, read_dataset
from core.data.media import IMAGE_TYPES, VIDEO_TYPES
from core.data.samples import sample_path
from core.world import write_part

DATASETS = {
    "Offline world: novel colours (image-text, VQA)": ("world", "novel-colours"),
    "Photos: 8 photographs with captions and questions (image-text, VQA)": ("sample", "photos"),
    "Clips: 6 short videos with captions and questions (video-text, VQA)": ("sample", "clips"),
    "Offline world: novel compositions (image-text, VQA)": ("world", "novel-compositions"),
    "Offline world: novel textures (image-text, VQA)": ("world", "novel-textures"),
    "Offline world: novel motion (video-text, VQA)": ("world", "novel-motion"),
    "Offline world: base scenes, as pretrained (image-text, VQA)": ("world", "base"),
}
WORLD_ITEMS = {"novel-motion": 24}   # clips take longer to write and decode than pictures
WORLD_PICTURES = 64
PREVIEW_LIMIT = 48
DATA_TYPES = [".zip", ".csv", ".jsonl", *IMAGE_TYPES, *VIDEO_TYPES]


def layout(page) -> None:
    with gr.Tab("Data", id="data"):
        with gr.Row():
            with gr.Column(scale=1):
                page.sample = gr.Dropdown(list(DATASETS), value=next(iter(DATASETS)), label="Bundled sample set")
                page.load_sample = gr.Button("Load sample set", variant="primary")
                page.upload = gr.File(label="…or upload a .zip, or captions.csv / data.jsonl with its media",
                                      file_count="multiple", file_types=DATA_TYPES)
                page.load_upload = gr.Button("Load upload")
            with gr.Column(scale=2):
                page.stats = gr.Markdown("No dataset yet: load a sample set or upload one.")
                page.report = gr.Markdown()
        page.preview = gr.Gallery(label="Preview (captions and questions)", columns=6, height=420,
                                  object_fit="contain")


def wire(page) -> None:
    outputs = [page.preview, page.stats, page.report, page.ask_pick, page.inspect_pick]
    page.load_sample.click(load_sample, [page.sample], outputs, api_name="load_sample")
    page.load_upload.click(upload_data, [page.upload], outputs, api_name="upload_data")


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
    """The media pickers of the Ask and Inspect tabs: the dataset's files."""
    choices = [item.media for item in session.dataset.items] if session.dataset else []
    value = choices[0] if choices else None
    return gr.update(choices=choices, value=value), gr.update(choices=choices, value=value)


def load_sample(choice: str, request: gr.Request):
    """A bundled set: the sample photos or clips, or a part of the offline world written for this session."""
    session = session_of(request)
    if not isinstance(choice, str) or choice not in DATASETS:
        raise gr.Error(f"unknown sample set {choice!r:.80}: choose one of {', '.join(DATASETS)}")
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
