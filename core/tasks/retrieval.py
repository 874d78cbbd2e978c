"""Image-text retrieval: symmetric InfoNCE with soft targets, Recall@K both ways, median rank."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.backbones import Backbone
from core.data import Dataset, Item

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_medr", "t2i_medr")


@dataclass
class RetrievalSet:
    """Decoded, preprocessed media and tokenized captions, made once per run."""

    pixels: torch.Tensor          # (images, 3, H, W)
    tokens: torch.Tensor          # (captions, context)
    caption_image: torch.Tensor   # (captions,) index of each caption's image

    def __len__(self) -> int:
        return len(self.caption_image)


def prepare(backbone: Backbone, dataset: Dataset, items: list[Item]) -> RetrievalSet:
    pixels, captions, owners = [], [], []
    for index, item in enumerate(items):
        with Image.open(dataset.path(item)) as image:
            pixels.append(backbone.image_transform(image.convert("RGB")))
        captions += item.captions
        owners += [index] * len(item.captions)
    if not captions:
        raise ValueError("retrieval needs captions, and these items have none")
    return RetrievalSet(torch.stack(pixels), backbone.tokenize(captions), torch.tensor(owners))


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs; pairs sharing an image are all positives."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    same = (image_ids[:, None] == image_ids[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class RetrievalObjective(nn.Module):
    """The trained module: a batch of caption indices -> contrastive loss (DDP wraps this).

    `context_enhancement` > 0 adds that multiple of the batch-mean text embedding to every
    text embedding in training: our dual-encoder adaptation of Aurora's informative context
    enhancement, which BLIP applies to the fused [CLS] of positive pairs.
    """

    def __init__(self, backbone: Backbone, data: RetrievalSet, context_enhancement: float = 0.0):
        super().__init__()
        self.backbone, self.data, self.context_enhancement = backbone, data, context_enhancement

    def forward(self, caption_ids: torch.Tensor) -> torch.Tensor:
        image_ids = self.data.caption_image[caption_ids]
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        device = self.backbone.device
        image_emb = self.backbone.encode_image(self.data.pixels[unique].to(device))[inverse.to(device)]
        text_emb = self.backbone.encode_text(self.data.tokens[caption_ids].to(device))
        if self.training and self.context_enhancement:
            text_emb = text_emb + self.context_enhancement * text_emb.mean(dim=0, keepdim=True)
        return contrastive_loss(image_emb, text_emb, image_ids.to(device), self.backbone.logit_scale)

    def batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(len(self.data), generator=generator)
        return list(order.split(batch_size))


@torch.no_grad()
def embed(backbone: Backbone, data: RetrievalSet, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and caption embeddings, on CPU."""
    was_training = backbone.training
    backbone.eval()
    images = torch.cat([backbone.encode_image(p).float().cpu() for p in data.pixels.split(batch_size)])
    texts = torch.cat([backbone.encode_text(t).float().cpu() for t in data.tokens.split(batch_size)])
    backbone.train(was_training)
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1)


def recall_metrics(similarity: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """Recall@1/5/10 (percent) both ways and median rank, from an (images × captions) matrix.

    A rank counts the wrong candidates scoring at least as high as the right one, so ties
    count against the model. i2t takes an image's best-scoring caption.
    """
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


def evaluate(backbone: Backbone, data: RetrievalSet) -> dict[str, float]:
    images, texts = embed(backbone, data)
    return recall_metrics(images @ texts.T, data.caption_image)
