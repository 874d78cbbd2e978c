"""Asking a model about a dataset: its gallery ranked for a text, its captions ranked for a
picture or clip, and candidate answers ranked for a question. The app's Ask tab goes through
here. A gallery's embeddings are computed once per model state (`embed_gallery`) and searched
through the same FAISS index as an indexed folder (core.vector_index); backbones with a matching
head (BLIP) re-score each query's top candidates by ITM + ITC, as their evaluation does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from core.backbones import Backbone
from core.data import Dataset, DatasetError
from core.data.reader import media_problem
from core.data.media import DEFAULT_FRAMES, IMAGE_TYPES, VIDEO_TYPES, load_media, open_image, read_video_frames
from core.pet import PetHandle
from core.tasks.encoding import embed_media, embed_texts, encode_media, evaluating, media_tokens
from core.tasks.matching import RERANK_TOP, match_scores
from core.tasks.vqa import answer_scores, normalize_answer, prompt
from core.vector_index import VectorIndex, VectorIndexError



MAX_QUERY_CHARACTERS = 1000   # a typed query or question; longer ones are cut, and the result says so


class QueryError(ValueError):
    """A query that cannot be answered, with a message meant for the user."""


def _fit_text(backbone: Backbone, text: str, what: str,
              wrap: Callable[[str], list[str]] = lambda text: [text]) -> tuple[str, Optional[str]]:
    """`text` shortened by whole words until every text `wrap(text)` makes fits the text tower's
    context, and a note saying so when it had to be cut (None when it fits)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError(f"type a {what}")
    words = text[:MAX_QUERY_CHARACTERS].split()

    def fits(n: int) -> bool:
        return not any(backbone.cut_by_tokenizer(wrap(" ".join(words[:n]))))

    if len(text) <= MAX_QUERY_CHARACTERS and fits(len(words)):
        return text, None
    low, high = 0, len(words)     # the most words that fit: binary search, the tokenizer is the judge
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    if low == 0:
        raise QueryError(f"the {what} leaves no room in the model's text context: shorten it")
    kept = " ".join(words[:low])
    return kept, (f"the {what} was too long for the model and was cut to its first {low} of "
                  f"{len(text.split())} words: “{kept[:80]}{'…' if len(kept) > 80 else ''}”")


@dataclass
class Hit:
    index: int      # into the gallery's media (text queries) or captions (media queries)
    score: float


@dataclass
class Gallery:
    """A dataset's media and captions, decoded and preprocessed for one backbone's transform."""

    paths: list[Path]
    pixels: torch.Tensor            # (media, 3, H, W) or (media, frames, 3, H, W)
    captions: list[str]
    caption_media: list[int]        # each caption's media index

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]


@dataclass
class GalleryEmbeddings:
    """One model state's L2-normalised embeddings of a gallery, and their search indexes (built
    on first use)."""

    media: torch.Tensor              # (media, D)
    captions: Optional[torch.Tensor]  # (captions, D), None when the dataset has no captions
    _indexes: dict[str, VectorIndex] = field(default_factory=dict, repr=False)

    def index(self, of: str) -> VectorIndex:
        if of not in self._indexes:
            try:
                self._indexes[of] = VectorIndex.build(getattr(self, of))
            except VectorIndexError as error:
                raise QueryError(str(error)) from error
        return self._indexes[of]


def media_kind(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_TYPES:
        return "image"
    if suffix in VIDEO_TYPES:
        return "video"
    raise QueryError(f"{Path(path).name}: not an image ({', '.join(IMAGE_TYPES)}) "
                     f"or a video ({', '.join(VIDEO_TYPES)})")


def load_gallery(backbone: Backbone, dataset: Dataset, frames: int = DEFAULT_FRAMES) -> Gallery:
    """Every item of `dataset` (both splits), through the backbone's image transform."""
    pixels, captions, owners = [], [], []
    for index, item in enumerate(dataset.items):
        pixels.append(load_media(dataset.path(item), item.kind, backbone.image_transform, frames))
        captions += item.captions
        owners += [index] * len(item.captions)
    return Gallery([dataset.path(i) for i in dataset.items], torch.stack(pixels), captions, owners)


def embed_gallery(backbone: Backbone, gallery: Gallery) -> GalleryEmbeddings:
    captions = embed_texts(backbone, backbone.tokenize(gallery.captions)) if gallery.captions else None
    return GalleryEmbeddings(embed_media(backbone, gallery.pixels), captions)


def _checked_media(path: str | Path) -> str:
    """The kind of a query's picture or clip, after the dataset reader's checks of one file
    (type, size, pixels, decoding), so a query cannot exhaust memory either."""
    kind = media_kind(path)
    if problem := media_problem(Path(path)):
        raise QueryError(f"{Path(path).name}: {problem}")
    return kind


def _load_query_media(backbone: Backbone, path: str | Path, frames: int) -> torch.Tensor:
    kind = _checked_media(path)
    try:
        return load_media(path, kind, backbone.image_transform, frames)[None]
    except DatasetError as error:   # a clip damaged beyond the frames the check decodes
        raise QueryError(str(error.problems[0])) from error


def _inference(function: Callable) -> Callable:
    """No gradients and eval mode (no dropout) for the call; the backbone is the first argument."""
    @functools.wraps(function)
    def run(backbone: Backbone, *args, **kwargs):
        with torch.no_grad(), evaluating(backbone):
            return function(backbone, *args, **kwargs)
    return run


def _finite(scores: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(scores).all():
        raise QueryError("the model gives scores that are not finite numbers (NaN or infinite): it is broken, "
                         "so nothing is ranked")
    return scores


def _top(scores: torch.Tensor, k: int) -> list[Hit]:
    values, indices = _finite(scores).topk(min(k, len(scores)))
    return [Hit(int(i), float(v)) for v, i in zip(values, indices)]


def _nearest(index: VectorIndex, query: torch.Tensor, k: int,
             rescore: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> list[Hit]:
    """The index's k nearest to `query`, best first; with `rescore`, the top RERANK_TOP are
    ordered by `rescore(candidates)` + similarity instead (BLIP's ITM + ITC)."""
    try:
        scores, ids = index.search(query, max(k, RERANK_TOP) if rescore else k)
    except VectorIndexError as error:
        raise QueryError(str(error)) from error
    scores, ids = torch.from_numpy(scores[0]), torch.from_numpy(ids[0])
    if rescore is not None:
        top = ids[:RERANK_TOP]
        scores[:len(top)] += rescore(top).float().cpu()
        order = scores.argsort(descending=True, stable=True)
        scores, ids = scores[order], ids[order]
    return [Hit(int(i), float(v)) for v, i in zip(_finite(scores[:k]), ids[:k])]


def text_query(backbone: Backbone, text: str) -> tuple[torch.Tensor, torch.Tensor, Optional[str]]:
    """A typed query's tokens and (1, D) embedding, cut to fit the text tower (and the note saying so)."""
    text, note = _fit_text(backbone, text, "text to search with")
    tokens = backbone.tokenize([text])
    return tokens, embed_texts(backbone, tokens), note


def media_query(backbone: Backbone, path: str | Path, frames: int = DEFAULT_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """A query picture's or clip's pixels and (1, D) embedding, after the dataset reader's checks."""
    pixels = _load_query_media(backbone, path, frames)
    return pixels, embed_media(backbone, pixels)


@dataclass
class Search:
    hits: list[Hit]
    note: Optional[str] = None   # what the query had to give up (a text cut to fit the model)


@_inference
def search_by_text(backbone: Backbone, gallery: Gallery, embeddings: GalleryEmbeddings, text: str,
                   k: int = 5) -> Search:
    """The gallery's media best matching `text`, best first: cosine similarity (BLIP: ITM + ITC
    on the top candidates)."""
    tokens, query, note = text_query(backbone, text)
    rescore = (lambda top: match_scores(backbone, media_tokens(backbone, gallery.pixels[top]),
                                        tokens.expand(len(top), -1))) if backbone.has("matching") else None
    return Search(_nearest(embeddings.index("media"), query, k, rescore), note)


@_inference
def search_by_media(backbone: Backbone, gallery: Gallery, embeddings: GalleryEmbeddings, path: str | Path,
                    k: int = 5, frames: int = DEFAULT_FRAMES) -> Search:
    """The gallery's captions best matching the picture or clip at `path`, best first."""
    if embeddings.captions is None:
        raise QueryError("this dataset has no captions to rank")
    pixels, query = media_query(backbone, path, frames)
    rescore = None
    if backbone.has("matching"):
        image_tokens = media_tokens(backbone, pixels)   # one pass through the vision tower for every candidate
        rescore = lambda top: match_scores(  # noqa: E731
            backbone, image_tokens, backbone.tokenize([gallery.captions[i] for i in top.tolist()]))
    return Search(_nearest(embeddings.index("captions"), query, k, rescore))


@dataclass
class Answers:
    ranked: list[tuple[str, float]]   # candidate answers with their probability, best first
    generated: Optional[str] = None   # the decoder's own answer (answer-generating backbones)
    note: Optional[str] = None        # what the question had to give up (cut to fit the model)


@_inference
def answer(backbone: Backbone, path: str | Path, question: str, candidates: list[str], k: int = 5,
           frames: int = DEFAULT_FRAMES) -> Answers:
    """Rank `candidates` for `question` about the picture or clip at `path` (probabilities over
    the candidates); answer-generating backbones also generate their own answer."""
    candidates = list(dict.fromkeys(a for a in (normalize_answer(c) for c in candidates) if a))
    if not candidates and not backbone.has("answer_generation"):
        raise QueryError("this model ranks answers: give candidate answers (the dataset has none)")
    # A dual encoder reads question and answer as one text: the question is cut until every
    # candidate's text keeps its answer, or all candidates would score alike.
    wrap = (lambda q: [q]) if backbone.has("answer_generation") else (lambda q: [prompt(q, a) for a in candidates])
    question, note = _fit_text(backbone, question, "question", wrap)
    pixels = _load_query_media(backbone, path, frames)
    generated = None
    logits = torch.empty(0)
    if backbone.has("answer_generation"):
        tokens = media_tokens(backbone, pixels)
        questions = backbone.tokenize([question])
        generated = backbone.generate_answers(tokens, questions)[0]
        if candidates:
            logits = backbone.answer_log_likelihoods(tokens, questions, backbone.tokenize(candidates)).cpu()
    else:
        logits = answer_scores(backbone, encode_media(backbone, pixels), [question], candidates)[0].float().cpu()
    probabilities = logits.softmax(dim=0) if len(logits) else logits
    ranked = [(candidates[h.index], h.score) for h in _top(probabilities, k)] if len(logits) else []
    return Answers(ranked, generated, note)


@dataclass
class GateView:
    readout: dict[str, torch.Tensor]   # the handle's gate readout (see PetHandle.gate_readout)
    picture: Optional[Image.Image]     # the picture it was read on (a clip: its middle frame)
    patch_map: Optional[torch.Tensor]  # (rows, cols): per-token vision gates, mean over layers and sites


@torch.no_grad()
def read_gates(handle: PetHandle, path: Optional[str | Path] = None, text: Optional[str] = None) -> GateView:
    """The handle's gates on one picture (a clip: its middle frame) and one text; per-token
    vision gates (VL-PET middleX, large) are also averaged into one map over the picture's patches."""
    backbone = handle.backbone
    picture, pixels = None, None
    if path is not None:
        kind = _checked_media(path)
        try:
            picture = read_video_frames(path, 1)[0] if kind == "video" else open_image(path).convert("RGB")
        except Exception as error:   # PIL and decord raise many types for a broken file
            raise QueryError(f"{Path(path).name}: could not be read as {kind} ({error})") from error
        pixels = backbone.image_transform(picture)[None].to(backbone.device)
    tokens = backbone.tokenize([text]) if text else None
    readout = handle.gate_readout(pixels, tokens.to(backbone.device) if tokens is not None else None)
    return GateView(readout, picture, handle.vision_token_map(readout))
