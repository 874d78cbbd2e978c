"""Visual question answering.

Dual encoders rank answers: each candidate a is scored against the image as the text
"question: {q} answer: {a}"; training is cross-entropy over the candidate set (soft targets when
several annotators answered), and zero-shot works the same way. The candidates are every answer
in the dataset plus any the user adds. Backbones with an answer decoder (BLIP VQA) generate the
answer instead, trained with teacher forcing on the most common answer.
VQA accuracy: min(#annotators who gave the answer / 3, 1) when several answers are given,
exact match otherwise, after normalisation.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.backbones import Backbone
from core.data import Dataset, Item
from core.data.media import DEFAULT_FRAMES, load_media
from core.tasks.encoding import (EncodedMedia, batch_media_spread, embed_from_tokens, embed_media, encode_media,
                                 evaluating, media_token_chunks, media_tokens, similarity_spread)
from core.tasks.frozen import FrozenCache

METRICS = {"vqa_acc": "VQA accuracy"}   # key -> how people read it
METRIC_KEYS = tuple(METRICS)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(answer: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed."""
    return " ".join(_ARTICLES.sub(" ", answer.lower().translate(_PUNCTUATION)).split())


def vqa_accuracy(predicted: str, answers: tuple[str, ...] | list[str]) -> float:
    predicted = normalize_answer(predicted)
    matches = sum(normalize_answer(a) == predicted for a in answers)
    if len(answers) > 1:
        return min(matches / 3.0, 1.0)
    return float(matches > 0)


def prompt(question: str, answer: str) -> str:
    return f"question: {question} answer: {answer}"


def candidate_answers(items: list[Item], extra: tuple[str, ...] = ()) -> list[str]:
    """Every distinct normalised answer in `items`, then the user's extra ones, in first-seen order."""
    seen: dict[str, None] = {}
    for item in items:
        for qa in item.qa:
            for answer in qa.answers:
                seen.setdefault(normalize_answer(answer), None)
    for answer in extra:
        seen.setdefault(normalize_answer(answer), None)
    return [a for a in seen if a]


@dataclass
class VqaSet:
    pixels: torch.Tensor               # (images, 3, H, W), or (videos, frames, 3, H, W)
    question_image: torch.Tensor       # (questions,)
    questions: list[str]
    answers: list[tuple[str, ...]]
    targets: torch.Tensor              # (questions, candidates): share of annotators per candidate
    candidates: list[str]
    question_tokens: torch.Tensor      # (questions, length): for answer decoders
    answer_tokens: torch.Tensor        # (questions, length): each question's most common answer

    def __len__(self) -> int:
        return len(self.questions)


def prepare(backbone: Backbone, dataset: Dataset, items: list[Item], candidates: list[str],
            frames: int = DEFAULT_FRAMES) -> VqaSet:
    index = {a: i for i, a in enumerate(candidates)}
    pixels, owners, questions, answers, targets = [], [], [], [], []
    for image_index, item in enumerate(items):
        pixels.append(load_media(dataset.path(item), item.kind, backbone.image_transform, frames))
        for qa in item.qa:
            target = torch.zeros(len(candidates))
            for answer in qa.answers:
                if normalize_answer(answer) in index:
                    target[index[normalize_answer(answer)]] += 1
            owners.append(image_index)
            questions.append(qa.question)
            answers.append(qa.answers)
            targets.append(target / target.sum().clamp(min=1))
    if not questions:
        raise ValueError("VQA needs questions with answers, and these items have none")
    most_common = [Counter(normalize_answer(a) for a in given).most_common(1)[0][0] for given in answers]
    return VqaSet(torch.stack(pixels), torch.tensor(owners), questions, answers, torch.stack(targets), candidates,
                  backbone.tokenize(questions), backbone.tokenize(most_common))


def answer_scores(backbone: Backbone, image_emb: torch.Tensor, questions: list[str],
                  candidates: list[str]) -> torch.Tensor:
    """(questions, candidates) logits: scaled cosine of each image with each question-answer text."""
    texts = [prompt(q, a) for q in questions for a in candidates]
    text_emb = backbone.encode_text(backbone.tokenize(texts)).view(len(questions), len(candidates), -1)
    return answer_logits(backbone, image_emb, text_emb)


def answer_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(questions, candidates) cosines from (questions, D) image and (questions, candidates, D) text embeddings."""
    return torch.einsum("bd,bcd->bc", F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1))


def answer_logits(backbone: Backbone, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(questions, candidates) logits: the `answer_cosines` at the backbone's logit scale."""
    return backbone.logit_scale.exp() * answer_cosines(image_emb, text_emb)


class VqaObjective(nn.Module):
    """A batch of question indices -> cross-entropy over the candidate answers.

    What no trainable parameter influences is computed once per item and kept (core.tasks.frozen):
    a frozen vision tower's embeddings (BLIP VQA: its vision tokens), a frozen text tower's
    embedding of each question-answer text, the features a linear probe projects, the input of a
    tower's lowest adapted block. `cache_frozen=False` turns that off (same results). `last_spread`
    is the last batch's spread of answer logits (None where answers are generated) and
    `last_media_spread` its distinct media's (core.tasks.encoding.batch_media_spread), for the
    trainer's guard.
    """

    def __init__(self, backbone: Backbone, data: VqaSet, cache_frozen: bool = True):
        super().__init__()
        self.backbone, self.data = backbone, data
        self.frozen = FrozenCache(backbone, enabled=cache_frozen)
        self.last_spread: Optional[torch.Tensor] = None
        self.last_media_spread: Optional[torch.Tensor] = None
        self.chance_loss: Optional[float] = None   # the last batch's loss had it scored every answer alike

    def forward(self, question_ids: torch.Tensor) -> torch.Tensor:
        image_ids = self.data.question_image[question_ids]
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        device = self.backbone.device
        encode = media_tokens if self.backbone.has("answer_generation") else encode_media
        media = self.frozen.rows("media_tokens" if encode is media_tokens else "media", unique,
                                 lambda ids: encode(self.backbone, self.data.pixels[ids]), len(self.data.pixels))
        frames = self.data.pixels.shape[1] if self.data.pixels.ndim == 5 else 1
        with torch.no_grad():
            self.last_media_spread = batch_media_spread(
                embed_from_tokens(self.backbone, media, frames) if encode is media_tokens else media)
        media = media[inverse.to(device)]
        if self.backbone.has("answer_generation"):
            return self.backbone.answer_loss(media, self.data.question_tokens[question_ids],
                                             self.data.answer_tokens[question_ids])
        count = len(self.data.candidates)
        rows = (question_ids[:, None] * count + torch.arange(count)).flatten()   # question-major, as answer_scores
        text_emb = self.frozen.rows("answers", rows, self._encode_prompts, len(self.data) * count)
        cosine = answer_cosines(media, text_emb.view(len(question_ids), count, -1))
        self.last_spread = similarity_spread(cosine, self.backbone.logit_scale)
        targets = self.data.targets[question_ids]
        # uniform scores cost log(count) against any target distribution (a question with no answer
        # among the candidates has none, and costs nothing)
        self.chance_loss = math.log(count) * float(targets.sum(dim=1).mean())
        logits = self.backbone.logit_scale.exp() * cosine
        return F.cross_entropy(logits.float(), targets.to(device))

    def _encode_prompts(self, rows: torch.Tensor) -> torch.Tensor:
        """The embeddings of the question-answer texts numbered question × candidates + candidate;
        each text is tokenized once (its tokens are kept like any frozen value)."""
        tokens = self.frozen.rows("prompt_tokens", rows, self._tokenize_prompts,
                                  len(self.data) * len(self.data.candidates))
        return self.backbone.encode_text(tokens)

    def _tokenize_prompts(self, rows: torch.Tensor) -> torch.Tensor:
        count = len(self.data.candidates)
        texts = [prompt(self.data.questions[r // count], self.data.candidates[r % count]) for r in rows.tolist()]
        return self.backbone.tokenize(texts)

    def batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        return list(torch.randperm(len(self.data), generator=generator).split(batch_size))


@torch.no_grad()
def predict(backbone: Backbone, data: VqaSet, media: Optional[EncodedMedia] = None, batch_size: int = 16) -> list[str]:
    """Each question's answer; `media`, the media's `encode_test_media` where they were encoded
    already (a dual encoder embeds each picture once, however many questions it has; an answer
    decoder reads the vision tokens, kept there or computed here)."""
    if backbone.has("answer_generation"):
        return _generated_answers(backbone, data, batch_size, media.tokens if media is not None else None)
    predictions = []
    embeddings = media.embeddings if media is not None else embed_media(backbone, data.pixels)
    with evaluating(backbone):
        for ids in torch.arange(len(data)).split(batch_size):
            image_emb = embeddings[data.question_image[ids]].to(backbone.device)
            scores = answer_scores(backbone, image_emb, [data.questions[i] for i in ids], data.candidates).float()
            # A non-finite score (a broken model) picks nothing, so it is never counted as right.
            scores = torch.where(torch.isfinite(scores), scores, float("-inf"))
            best = scores.max(dim=1)
            predictions += [data.candidates[i] if torch.isfinite(v) else ""
                            for v, i in zip(best.values, best.indices)]
    return predictions


def _generated_answers(backbone: Backbone, data: VqaSet, batch_size: int,
                       tokens: Optional[torch.Tensor] = None) -> list[str]:
    """Each question's answer from the decoder, which cross-attends to every vision token: the
    pictures' `tokens` where a scoring kept them, else each picture through the vision tower once
    here, however many questions it has (its tokens kept for `batch_size` pictures at a time); a
    picture's questions are answered together: the question encoder projects its tokens to
    cross-attention keys and values once for all of them."""
    answers = [""] * len(data)
    # each picture's questions, in their order (a picture may have none)
    asked = torch.argsort(data.question_image, stable=True).split(
        torch.bincount(data.question_image, minlength=len(data.pixels)).tolist())
    with evaluating(backbone):
        for start, chunk in media_token_chunks(backbone, data.pixels, batch_size, tokens):
            for picture, picture_tokens in enumerate(chunk.split(1), start):
                for ids in asked[picture].split(batch_size) if len(asked[picture]) else ():
                    generated = backbone.generate_answers(picture_tokens, data.question_tokens[ids])
                    for i, answer in zip(ids.tolist(), generated):
                        answers[i] = answer
    return answers


def evaluate(backbone: Backbone, data: VqaSet, media: Optional[EncodedMedia] = None) -> dict[str, float]:
    """VQA accuracy on `data`; `media` as `predict` takes it."""
    predictions = predict(backbone, data, media)
    accuracy = sum(vqa_accuracy(p, a) for p, a in zip(predictions, data.answers)) / len(predictions)
    return {"vqa_acc": 100.0 * accuracy}
