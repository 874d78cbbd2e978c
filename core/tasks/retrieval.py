"""Image-text retrieval: symmetric InfoNCE with soft targets, Recall@K both ways, median rank.

Backbones with a matching head (BLIP) also train image-text matching (ITM) on the positive
pairs and on hard negatives drawn by ITC similarity, and at evaluation re-rank each query's
top k candidates by ITM, as BLIP does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.backbones import Backbone
from core.data import Dataset, Item
from core.data.media import DEFAULT_FRAMES, load_media
from core.distributed import gather, gather_with_grad
from core.tasks.encoding import (EncodedMedia, batch_media_spread, embed_texts, encode_media, encode_test_media,
                                 evaluating, media_token_chunks, media_tokens, similarity_spread)
from core.tasks.frozen import FrozenCache
from core.tasks.matching import BELOW, RERANK_TOP, match_scores

if TYPE_CHECKING:
    from core.pet import PetHandle

METRICS = {   # key -> how people read it
    "i2t_r1": "image→text R@1", "i2t_r5": "image→text R@5", "i2t_r10": "image→text R@10",
    "t2i_r1": "text→image R@1", "t2i_r5": "text→image R@5", "t2i_r10": "text→image R@10",
    "i2t_medr": "image→text median rank", "t2i_medr": "text→image median rank",
}
METRIC_KEYS = tuple(METRICS)
LOWER_IS_BETTER = frozenset({"i2t_medr", "t2i_medr"})


@dataclass
class RetrievalSet:
    """Decoded, preprocessed media and tokenized captions, made once per run."""

    pixels: torch.Tensor          # (images, 3, H, W), or (videos, frames, 3, H, W)
    tokens: torch.Tensor          # (captions, context)
    caption_image: torch.Tensor   # (captions,) index of each caption's image

    def __len__(self) -> int:
        return len(self.caption_image)


def prepare(backbone: Backbone, dataset: Dataset, items: list[Item], frames: int = DEFAULT_FRAMES) -> RetrievalSet:
    pixels, captions, owners = [], [], []
    for index, item in enumerate(items):
        pixels.append(load_media(dataset.path(item), item.kind, backbone.image_transform, frames))
        captions += item.captions
        owners += [index] * len(item.captions)
    if not captions:
        raise ValueError("retrieval needs captions, and these items have none")
    return RetrievalSet(torch.stack(pixels), backbone.tokenize(captions), torch.tensor(owners))


def cosine_matrix(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(images, captions) cosine similarities."""
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


def contrastive_loss(cosine: torch.Tensor, image_ids: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs from their `cosine_matrix`; pairs
    sharing an image are all positives."""
    logits = logit_scale.exp() * cosine
    same = (image_ids[:, None] == image_ids[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class RetrievalObjective(nn.Module):
    """The trained module: a batch of caption indices -> contrastive loss (DDP wraps this).

    In training, the attached method may mix the batch's text context into the text side
    (`PetHandle.contextualise`, e.g. Aurora's informative context enhancement): into each text
    embedding on a dual encoder, into the fused [CLS] of the positive pairs on BLIP.

    What no trainable parameter influences is computed once per item and kept (core.tasks.frozen):
    a frozen tower's embeddings (BLIP: its vision tokens, its unimodal text [CLS]), the features a
    linear probe projects, the input of a tower's lowest adapted block. `cache_frozen=False` turns
    that off (the results are the same, computed every time). Caption ids stay on the host (the
    trainer makes them there), so indexing the data never waits on the device. `last_spread` is the
    last batch's spread of logits (core.tasks.encoding.similarity_spread) and `last_media_spread` its
    distinct media's (core.tasks.encoding.batch_media_spread), for the trainer's guard.
    """

    def __init__(self, backbone: Backbone, data: RetrievalSet, handle: Optional[PetHandle] = None,
                 cache_frozen: bool = True):
        super().__init__()
        self.backbone, self.data, self.handle = backbone, data, handle
        self.frozen = FrozenCache(backbone, enabled=cache_frozen)
        self.last_spread: Optional[torch.Tensor] = None
        self.last_media_spread: Optional[torch.Tensor] = None
        self.chance_loss: Optional[float] = None   # the last batch's loss had it scored every pair alike

    def _contextualise(self, embeddings: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not self.training or self.handle is None:
            return embeddings
        return self.handle.contextualise(embeddings, context)

    def forward(self, caption_ids: torch.Tensor) -> torch.Tensor:
        if self.backbone.has("matching"):
            return self._contrastive_and_matching_loss(caption_ids)
        image_ids = self.data.caption_image[caption_ids]
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        device = self.backbone.device
        media_emb = self._media_rows("media", unique, encode_media)
        self.last_media_spread = batch_media_spread(media_emb)
        image_emb = media_emb[inverse.to(device)]
        text_emb = self.frozen.rows("captions", caption_ids,
                                    lambda ids: self.backbone.encode_text(self.data.tokens[ids].to(device)),
                                    len(self.data))
        # Across processes every pair of the global batch is a negative for every other: each process
        # computes the global loss (DDP's average of its gradients is then the one-process gradient).
        image_emb, text_emb = gather_with_grad(image_emb), gather_with_grad(text_emb)
        text_emb = self._contextualise(text_emb, text_emb)
        cosine = cosine_matrix(image_emb, text_emb)
        self.last_spread = similarity_spread(cosine, self.backbone.logit_scale)
        self.chance_loss = math.log(len(cosine))   # contrastive_loss with every pair scored alike
        return contrastive_loss(cosine, gather(image_ids.to(device)), self.backbone.logit_scale)

    def _media_rows(self, key: str, images: torch.Tensor, encode) -> torch.Tensor:
        """`encode(backbone, pixels)` of the given images, kept per image where frozen."""
        return self.frozen.rows(key, images, lambda ids: encode(self.backbone, self.data.pixels[ids]),
                                len(self.data.pixels))

    def _contrastive_and_matching_loss(self, caption_ids: torch.Tensor) -> torch.Tensor:
        backbone, device = self.backbone, self.backbone.device
        unique, inverse = torch.unique(self.data.caption_image[caption_ids], return_inverse=True)
        image_ids = self.data.caption_image[caption_ids].to(device)
        pictures = inverse.to(device)
        unique_tokens = self._media_rows("media_tokens", unique, media_tokens)
        tokens = self.data.tokens[caption_ids].to(device)
        text_cls = self.frozen.rows("text_cls", caption_ids,
                                    lambda ids: backbone.text_cls(self.data.tokens[ids].to(device)), len(self.data))
        unique_emb, text_emb = backbone.embed_image_tokens(unique_tokens), backbone.embed_text_cls(text_cls)
        self.last_media_spread = batch_media_spread(unique_emb.detach())
        cosine = cosine_matrix(unique_emb[pictures], text_emb)
        self.last_spread = similarity_spread(cosine, backbone.logit_scale)
        loss = contrastive_loss(cosine, image_ids, backbone.logit_scale)
        self.chance_loss = math.log(len(cosine))
        if len(unique) == 1:
            return loss   # one image in the batch: no negatives to match against
        self.chance_loss += math.log(2)   # the matching head's, scoring match and no match alike
        same = image_ids[:, None] == image_ids[None, :]
        with torch.no_grad():  # hard negatives, drawn by ITC similarity among other images' pairs
            similarity = cosine.detach()
            weights = similarity.float().softmax(dim=1).masked_fill(same, 0) + (~same) * 1e-8
            negative_text = torch.multinomial(weights, 1).squeeze(1)
            weights = similarity.float().T.softmax(dim=1).masked_fill(same, 0) + (~same) * 1e-8
            negative_image = torch.multinomial(weights, 1).squeeze(1)
        # the positive pairs, then each picture with a hard negative text, then each text with a hard
        # negative picture: one pass, in which each picture is projected to keys and values once
        fused = backbone.fused_cls(unique_tokens, torch.cat([tokens, tokens[negative_text], tokens]),
                                   torch.cat([pictures, pictures, pictures[negative_image]]))
        fused = torch.cat([self._contextualise(fused[:len(tokens)], text_cls), fused[len(tokens):]])
        labels = torch.cat([torch.ones_like(image_ids), torch.zeros(2 * len(image_ids), dtype=torch.long,
                                                                    device=device)])
        return loss + F.cross_entropy(backbone.match_logits(fused).float(), labels)

    def batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(len(self.data), generator=generator)
        return list(order.split(batch_size))


def recall_metrics(similarity: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """Recall@1/5/10 (percent) both ways and median rank, from an (images × captions) matrix.

    A rank counts the wrong candidates scoring at least as high as the right one, so ties
    count against the model. i2t takes an image's best-scoring caption. A score that is not
    finite (NaN, ±inf: a broken model) counts as the worst possible, so it can never look good.
    """
    similarity = torch.where(torch.isfinite(similarity), similarity, float("-inf"))
    n_images = similarity.shape[0]
    own = caption_image[None, :] == torch.arange(n_images)[:, None]            # (images, captions)
    correct = similarity[caption_image, torch.arange(similarity.shape[1])]       # (captions,)
    t2i_rank = ((similarity >= correct[None, :]) & ~own).sum(dim=0)
    best_own = similarity.masked_fill(~own, float("-inf")).max(dim=1).values     # (images,)
    i2t_rank = ((similarity >= best_own[:, None]) & ~own).sum(dim=1)
    metrics = {}
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in (1, 5, 10):
            metrics[f"{direction}_r{k}"] = 100.0 * (rank < k).float().mean().item()
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        metrics[f"{direction}_medr"] = float(rank.float().quantile(0.5).item() + 1)
    return metrics


@torch.no_grad()
def rerank_by_matching(backbone: Backbone, data: RetrievalSet, similarity: torch.Tensor,
                       k: int, batch_size: int = 64, tokens: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) score matrices where each query's top-k ITC candidates are re-scored by
    ITM logit + ITC similarity and the rest stay below them (BLIP's evaluation). The vision tokens
    are the test media's `tokens` where a scoring kept them, else those of `batch_size` test media
    at a time, computed here (5,000 images' tokens would not fit); a pair in the top k of both its
    image and its text is matched once, for both, and each picture's texts are matched together
    (its cross-attention keys and values computed once)."""
    by_image = similarity.topk(min(k, similarity.shape[1]), dim=1).indices   # each image's top texts
    by_text = similarity.topk(min(k, similarity.shape[0]), dim=0).indices    # each text's top images
    wanted = torch.zeros_like(similarity, dtype=torch.bool)
    wanted.scatter_(1, by_image, True)
    wanted.scatter_(0, by_text, True)
    rescored = similarity.clone()
    with evaluating(backbone):
        for start, chunk in media_token_chunks(backbone, data.pixels, batch_size, tokens):
            for image, picture in enumerate(chunk.split(1), start):
                for text in wanted[image].nonzero().flatten().split(batch_size):
                    rescored[image, text] += match_scores(backbone, picture, data.tokens[text])
    i2t = torch.full_like(similarity, BELOW).scatter_(1, by_image, rescored.gather(1, by_image))
    t2i = torch.full_like(similarity, BELOW).scatter_(0, by_text, rescored.gather(0, by_text))
    return i2t, t2i


def evaluate(backbone: Backbone, data: RetrievalSet, media: Optional[EncodedMedia] = None,
             rerank_k: int = RERANK_TOP) -> dict[str, float]:
    """The metrics of `data`; `media`, its media's `encode_test_media` where they were encoded already."""
    media = media if media is not None else encode_test_media(backbone, data.pixels)
    texts = embed_texts(backbone, data.tokens)
    similarity = media.embeddings @ texts.T
    if not backbone.has("matching"):
        return recall_metrics(similarity, data.caption_image)
    i2t, t2i = rerank_by_matching(backbone, data, similarity, rerank_k, tokens=media.tokens)
    by_image, by_text = recall_metrics(i2t, data.caption_image), recall_metrics(t2i, data.caption_image)
    return {k: (by_image if k.startswith("i2t") else by_text)[k] for k in METRIC_KEYS}
