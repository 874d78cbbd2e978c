"""Ask: the frozen model and a tuned run side by side — text → the dataset's pictures or clips,
a picture or clip → the dataset's captions, questions → ranked (and, on BLIP VQA, generated)
answers — and a run's weights downloaded or loaded back."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from app.device import Call, on_device, query_seconds
from app.models import (MODELS, NO_RUN, ModelKey, frames_for, gallery, keep_gallery, media_path, models_for,
                        served_as)
from app.sessions import session_of
from app.tabs import weights
from core import query
from core.data.media import IMAGE_TYPES, VIDEO_TYPES
from core.tasks.vqa import candidate_answers

CAPTION_COLUMNS = ["rank", "score", "caption of", "caption"]
MAX_TYPED_ANSWERS = 100   # each is scored with the picture: a long list would hold the shared server


def layout(page) -> None:
    with gr.Tab("Ask", id="ask"):
        with gr.Row():
            page.ask_run = gr.Dropdown([NO_RUN], value=NO_RUN, label="Tuned run to compare with its frozen model "
                                                                     "(none: the Tune tab's backbone alone)")
        with gr.Tab("Text → media"):
            with gr.Row():
                page.text_query = gr.Textbox(label="Describe what to find", scale=4)
                page.search_text = gr.Button("Search", variant="primary", scale=1)
            with gr.Row():
                page.frozen_hits = gr.Gallery(label="frozen model: best matches", columns=5, height=280,
                                              elem_id="frozen-hits")
                page.tuned_hits = gr.Gallery(label="tuned model (the chosen run): best matches", columns=5,
                                             height=280, elem_id="tuned-hits")
        with gr.Tab("Media → text, and questions"):
            with gr.Row():
                with gr.Column():
                    page.ask_pick = gr.Dropdown([], label="A picture or clip of the dataset")
                    page.ask_upload = gr.File(label="…or upload one", file_types=[*IMAGE_TYPES, *VIDEO_TYPES])
                with gr.Column():
                    page.search_media = gr.Button("Find its captions", variant="primary")
                    page.question = gr.Textbox(label="Question")
                    page.ask_answers = gr.Textbox(label="Candidate answers, comma-separated (the dataset's are added)")
                    page.answer = gr.Button("Answer", variant="primary")
            with gr.Row():
                page.frozen_captions = gr.Dataframe(headers=CAPTION_COLUMNS, label="frozen: best captions",
                                                    interactive=False)
                page.tuned_captions = gr.Dataframe(headers=CAPTION_COLUMNS, label="tuned: best captions",
                                                   interactive=False)
            with gr.Row():
                page.frozen_answers = gr.Label(label="frozen: top answers", num_top_classes=5)
                page.tuned_answers = gr.Label(label="tuned: top answers", num_top_classes=5)
            page.generated = gr.Markdown()
        weights.layout(page)


def wire(page) -> None:
    models = [page.ask_run, page.model]
    hits = [page.frozen_hits, page.tuned_hits]
    page.search_text.click(search_text, [page.text_query, *models], hits, api_name="search_text",
                           concurrency_id="inference")
    page.text_query.submit(search_text, [page.text_query, *models], hits, api_name="search_text_submit",
                           concurrency_id="inference")
    page.search_media.click(search_media, [page.ask_upload, page.ask_pick, *models],
                            [page.frozen_captions, page.tuned_captions], api_name="search_media",
                            concurrency_id="inference")
    page.answer.click(answer_question, [page.ask_upload, page.ask_pick, page.question, page.ask_answers, *models],
                      [page.frozen_answers, page.tuned_answers, page.generated], api_name="answer",
                      concurrency_id="inference")
    weights.wire(page)


def _pad(results: list, empty) -> list:
    return results + [empty] * (2 - len(results))


def _warn(notes: set) -> None:
    for note in sorted(notes):
        gr.Warning(note)


def _galleries(session, run: str, model) -> list[tuple]:
    """(model key, gallery, its embeddings or None, the spec serving the key) for the frozen and the
    chosen tuned model."""
    frames = frames_for(session, run)
    keys = [key for _, key in models_for(session, run, model)]
    _warn(MODELS.load(keys).notes)   # here, before the call: a ZeroGPU worker inherits what this process holds
    return [(key, *gallery(session, key, frames)) for key in keys]


def _seconds(galleries: list[tuple], per_query: int = 1) -> float:
    return sum(query_seconds(key.spec, len(items.paths) + len(items.captions) if embeddings is None else 0) + per_query
               for key, items, embeddings, _ in galleries)


def _embedded(backbone, items, embeddings) -> query.GalleryEmbeddings:
    return embeddings if embeddings is not None else query.embed_gallery(backbone, items)


def _portable(embeddings: query.GalleryEmbeddings) -> query.GalleryEmbeddings:
    """The embeddings without their search index (a FAISS object does not cross a ZeroGPU worker)."""
    return query.GalleryEmbeddings(embeddings.media, embeddings.captions)


def _search_text_on(call: Call, galleries: list[tuple], text: str) -> list[tuple]:
    results = []
    for key, items, embeddings, served in galleries:
        with MODELS.on(call, key) as (backbone, _):
            served_as(backbone, key, served)
            embeddings = _embedded(backbone, items, embeddings)
            results.append((query.search_by_text(backbone, items, embeddings, text), _portable(embeddings)))
    return results


def _search_media_on(call: Call, galleries: list[tuple], path: str, frames: int) -> list[tuple]:
    results = []
    for key, items, embeddings, served in galleries:
        with MODELS.on(call, key) as (backbone, _):
            served_as(backbone, key, served)
            embeddings = _embedded(backbone, items, embeddings)
            results.append((query.search_by_media(backbone, items, embeddings, path, frames=frames),
                            _portable(embeddings)))
    return results


def _answer_on(call: Call, keys: list[ModelKey], path: str, question: str, candidates: list[str],
               frames: int) -> list[query.Answers]:
    answers = []
    for key in keys:
        with MODELS.on(call, key) as (backbone, _):
            answers.append(query.answer(backbone, path, question, candidates, frames=frames))
    return answers


def _keep(session, run: str, galleries: list[tuple], results: list[tuple]) -> None:
    for (key, items, _, served), (_, embeddings) in zip(galleries, results):
        keep_gallery(session, key, served, frames_for(session, run), items, embeddings)


def search_text(text: str, run: str, model: str, request: gr.Request):
    """Text → media over the dataset's gallery, frozen and tuned side by side."""
    session = session_of(request)
    with session.lock:
        galleries = _galleries(session, run, model)
        results = on_device(_search_text_on, galleries, text, seconds=_seconds(galleries))
        _keep(session, run, galleries, results)
    shown = [[(str(items.paths[h.index]), f"{h.score:.3f} · {items.names[h.index]}") for h in found.hits]
             for (_, items, _, _), (found, _) in zip(galleries, results)]
    _warn({found.note for found, _ in results} - {None})
    return tuple(_pad(shown, []))


def search_media(upload: Optional[str], pick: Optional[str], run: str, model: str, request: gr.Request):
    """Picture or clip → the dataset's captions, frozen and tuned side by side."""
    session = session_of(request)
    with session.lock:
        path = media_path(session, upload, pick)
        galleries = _galleries(session, run, model)
        results = on_device(_search_media_on, galleries, str(path), frames_for(session, run),
                            seconds=_seconds(galleries))
        _keep(session, run, galleries, results)
    shown = [[[i + 1, round(h.score, 4), items.names[items.caption_media[h.index]], items.captions[h.index]]
              for i, h in enumerate(found.hits)] for (_, items, _, _), (found, _) in zip(galleries, results)]
    return tuple(_pad(shown, None))


def answer_question(upload: Optional[str], pick: Optional[str], question: str, answers: str, run: str, model: str,
                    request: gr.Request):
    """VQA: candidate answers ranked (and generated, on BLIP VQA), frozen and tuned side by side."""
    session = session_of(request)
    with session.lock:
        path = media_path(session, upload, pick)
        typed = tuple(a.strip() for a in str(answers or "").split(",") if a.strip())
        if len(typed) > MAX_TYPED_ANSWERS or any(len(a) > 200 for a in typed):
            raise gr.Error(f"give at most {MAX_TYPED_ANSWERS} candidate answers of at most 200 characters each")
        candidates = candidate_answers(session.dataset.items if session.dataset else [], typed)
        labelled = models_for(session, run, model)
        keys = [key for _, key in labelled]
        _warn(MODELS.load(keys).notes)
        results = on_device(_answer_on, keys, str(path), question, candidates, frames_for(session, run),
                            seconds=sum(query_seconds(key.spec, 1) for key in keys))
    labels, generated = [], []
    for (label, _), result in zip(labelled, results):
        labels.append({a: p for a, p in result.ranked} or None)
        if result.generated is not None:
            generated.append(f"**{label}** generates: “{result.generated}”")
    notes = {result.note for result in results} - {None}
    _warn(notes)
    return (*_pad(labels, None), "\n\n".join([*(f"> **Note:** {n}" for n in sorted(notes)), *generated]))
