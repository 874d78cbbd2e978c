"""Media through the vision tower: an image as it is; a video as its frames, each through the
same tower (and the same PET deltas), their embeddings mean-pooled (then normalised by the
task), their tokens concatenated for heads that cross-attend to them. And how far apart a batch's
similarities are, which the trainer watches for a collapse, and how far apart a set of media
sit, which a run's result compares before and after tuning."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from core.backbones import Backbone


@contextmanager
def evaluating(backbone: Backbone) -> Iterator[None]:
    """Eval mode (no dropout) for the block, then the mode the backbone was in."""
    was_training = backbone.training
    backbone.eval()
    try:
        yield
    finally:
        backbone.train(was_training)


def encode_media(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings from (B, 3, H, W) images or (B, T, 3, H, W) videos."""
    pixels = pixels.to(backbone.device)
    if pixels.ndim == 4:
        return backbone.encode_image(pixels)
    batch, frames = pixels.shape[:2]
    return backbone.encode_image(pixels.flatten(0, 1)).view(batch, frames, -1).mean(dim=1)


def media_tokens(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, d) vision tokens for matching and answering (BLIP's ITM, question encoder); a video's
    T frames give T·N tokens, concatenated in frame order as the authors do, so cross-attention
    sees every frame rather than their average."""
    pixels = pixels.to(backbone.device)
    if pixels.ndim == 4:
        return backbone.image_tokens(pixels)
    tokens = backbone.image_tokens(pixels.flatten(0, 1))
    return tokens.view(pixels.shape[0], -1, tokens.shape[-1])


def media_token_chunks(backbone: Backbone, pixels: torch.Tensor, batch_size: int,
                       kept: Optional[torch.Tensor] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(the first medium's index, the `media_tokens` of `batch_size` media from it), a chunk at a
    time: slices of the tokens a scoring `kept` (`EncodedMedia.tokens`), else computed here."""
    for start in range(0, len(pixels), batch_size):
        yield start, (kept[start:start + batch_size] if kept is not None else
                      media_tokens(backbone, pixels[start:start + batch_size]))


@torch.no_grad()
def embed_media(backbone: Backbone, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised embeddings of images or videos, in eval mode, on CPU."""
    with evaluating(backbone):
        return F.normalize(torch.cat([encode_media(backbone, p).float().cpu() for p in pixels.split(batch_size)]),
                           dim=-1)


@torch.no_grad()
def embed_texts(backbone: Backbone, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised embeddings of tokenized texts, in eval mode, on CPU."""
    with evaluating(backbone):
        return F.normalize(torch.cat([backbone.encode_text(t.to(backbone.device)).float().cpu()
                                      for t in tokens.split(batch_size)]), dim=-1)


KEPT_TOKENS_MB = 256   # the most of its test media's vision tokens a scoring keeps (BLIP-base: 1.8 MB a picture, fp32)


@dataclass
class EncodedMedia:
    """Test media through the vision tower once, for one scoring: their `embeddings` (the space a
    run's media spread is measured in: the joint one, or the vision tower's [CLS] where there is
    none), and `tokens`, every medium's `media_tokens` for a backbone that reads them (matching,
    answering) where they fit in KEPT_TOKENS_MB (None: a scoring reads them again, a chunk at a time)."""
    embeddings: torch.Tensor
    tokens: Optional[torch.Tensor] = None


@torch.no_grad()
def encode_test_media(backbone: Backbone, pixels: torch.Tensor, batch_size: int = 64) -> EncodedMedia:
    """`EncodedMedia` of images or videos, in eval mode: L2-normalised embeddings on CPU, the tokens
    on the backbone's device. A backbone that reads vision tokens embeds from them (the [CLS] of each
    image or frame, through the vision projection where there is a joint space, frames averaged),
    so its media pass the vision tower once for the embeddings, the scores and the spread."""
    if not (backbone.has("matching") or backbone.has("answer_generation")):
        return EncodedMedia(embed_media(backbone, pixels, batch_size))
    frames = pixels.shape[1] if pixels.ndim == 5 else 1
    embeddings, kept = [], None
    with evaluating(backbone):
        for start in range(0, len(pixels), batch_size):
            tokens = media_tokens(backbone, pixels[start:start + batch_size])
            embeddings.append(embed_from_tokens(backbone, tokens, frames).cpu())
            if start == 0 and len(pixels) * tokens[0].nbytes <= KEPT_TOKENS_MB * 2 ** 20:
                kept = tokens.new_empty((len(pixels), *tokens.shape[1:]))
            if kept is not None:
                kept[start:start + len(tokens)] = tokens
    return EncodedMedia(F.normalize(torch.cat(embeddings), dim=-1), kept)


def embed_from_tokens(backbone: Backbone, tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, D) fp32 media embeddings from `media_tokens` of media of `frames` frames each: the [CLS] of
    each image or frame, through the vision projection where there is a joint space, frames averaged."""
    per_image = tokens.view(len(tokens) * frames, -1, tokens.shape[-1])   # a clip's frames one after another
    embedded = backbone.embed_image_tokens(per_image) if backbone.has("matching") else per_image[:, 0]
    return embedded.float().view(len(tokens), frames, -1).mean(dim=1)


def media_spread(embeddings: torch.Tensor) -> float:
    """How far apart media sit, from their L2-normalised embeddings (`EncodedMedia.embeddings`): the
    mean of 1 − cosine over their pairs (0: all embedded alike; NaN for fewer than two, or embeddings
    that are not finite)."""
    if len(embeddings) < 2:
        return float("nan")
    return float(_pair_spread(embeddings.double()))


def batch_media_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """The `media_spread` of a training batch's distinct media from their embeddings (not yet
    normalised), as a detached fp32 tensor on their device (no wait on it; NaN for fewer than two),
    for the trainer's guard."""
    if len(embeddings) < 2:
        return torch.full((), math.nan, device=embeddings.device)
    return _pair_spread(F.normalize(embeddings.detach().float(), dim=-1))


def _pair_spread(unit: torch.Tensor) -> torch.Tensor:
    """The mean of 1 − cosine over the pairs of L2-normalised rows, in [0, 2]; NaN where it is not finite."""
    count = len(unit)
    total = unit.sum(dim=0)
    # the off-diagonal cosines' sum from the rows' sum: no count × count matrix for a large test split;
    # in the rows' precision whatever the training's autocast (a bf16 product reads a spread of 0.0025
    # as 0.004, and an fp16 one overflows past ~256 distinct media)
    with torch.autocast(unit.device.type, enabled=False):
        off_diagonal = total @ total - (unit * unit).sum()
    spread = 1.0 - off_diagonal / (count * (count - 1))
    return spread.where(spread.isfinite(), math.nan).clamp(0.0, 2.0)   # rounding must not leave [0, 2]


def similarity_spread(cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """How far apart each query's logits — its cosine similarities to its candidates at the model's
    logit scale — are: their standard deviation, averaged over queries (detached; NaN with one
    candidate). Near 0 when the embeddings have collapsed onto one another and every candidate
    scores alike."""
    # the product in fp32: in bf16, logits near 100 round to steps of 0.5 (a collapse still reads ~0 either way)
    return (logit_scale.detach().float().exp() * cosine.detach().float()).std(dim=-1).mean()
