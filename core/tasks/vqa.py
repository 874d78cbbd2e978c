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

import re
import string
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.backbones import Backbone
from core.data import Dataset, Item
from core.data.media import DEFAULT_FRAMES, load_media
from core.tasks.encoding import encode_media, evaluating, media_tokens

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
    cosine = torch.einsum("bd,bcd->bc", F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1))
    return backbone.logit_scale.exp() * cosine


class VqaObjective(nn.Module):
    """A batch of question indices -> cross-entropy over the candidate answers."""

    def __init__(self, backbone: Backbone, data: VqaSet):
        super().__init__()
        self.backbone, self.data = backbone, data

    def forward(self, question_ids: torch.Tensor) -> torch.Tensor:
        image_ids = self.data.question_image[question_ids]
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        device = self.backbone.device
        if self.backbone.has("answer_generation"):
            tokens = media_tokens(self.backbone, self.data.pixels[unique])[inverse.to(device)]
            return self.backbone.answer_loss(tokens, self.data.question_tokens[question_ids],
                                             self.data.answer_tokens[question_ids])
        image_emb = encode_media(self.backbone, self.data.pixels[unique])[inverse.to(device)]
        logits = answer_scores(self.backbone, image_emb, [self.data.questions[i] for i in question_ids],
                               self.data.candidates)
        return F.cross_entropy(logits.float(), self.data.targets[question_ids].to(device))

    def batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        return list(torch.randperm(len(self.data), generator=generator).split(batch_size))


@torch.no_grad()
def predict(backbone: Backbone, data: VqaSet, batch_size: int = 16) -> list[str]:
    predictions = []
    with evaluating(backbone):
        for ids in torch.arange(len(data)).split(batch_size):
            if backbone.has("answer_generation"):
                tokens = media_tokens(backbone, data.pixels[data.question_image[ids]])
                predictions += backbone.generate_answers(tokens, data.question_tokens[ids])
                continue
            image_emb = encode_media(backbone, data.pixels[data.question_image[ids]])
            scores = answer_scores(backbone, image_emb, [data.questions[i] for i in ids], data.candidates).float()
            # A non-finite score (a broken model) picks nothing, so it is never counted as right.
            scores = torch.where(torch.isfinite(scores), scores, float("-inf"))
            best = scores.max(dim=1)
            predictions += [data.candidates[i] if torch.isfinite(v) else ""
                            for v, i in zip(best.values, best.indices)]
    return predictions


def evaluate(backbone: Backbone, data: VqaSet) -> dict[str, float]:
    predictions = predict(backbone, data)
    accuracy = sum(vqa_accuracy(p, a) for p, a in zip(predictions, data.answers)) / len(predictions)
    return {"vqa_acc": 100.0 * accuracy}
