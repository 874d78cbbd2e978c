"""Media through the vision tower: an image as it is; a video as its frames, each through the
same tower (and the same PET deltas), their embeddings mean-pooled (then normalised by the
task)."""
from __future__ import annotations

import torch

from core.backbones import Backbone


def encode_media(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings from (B, 3, H, W) images or (B, T, 3, H, W) videos."""
    pixels = pixels.to(backbone.device)
    if pixels.ndim == 4:
        return backbone.encode_image(pixels)
    batch, frames = pixels.shape[:2]
    return backbone.encode_image(pixels.flatten(0, 1)).view(batch, frames, -1).mean(dim=1)


def media_tokens(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, d) vision tokens for matching heads (BLIP's ITM); a video's are averaged over frames."""
    pixels = pixels.to(backbone.device)
    if pixels.ndim == 4:
        return backbone.image_tokens(pixels)
    batch, frames = pixels.shape[:2]
    tokens = backbone.image_tokens(pixels.flatten(0, 1))
    return tokens.view(batch, frames, *tokens.shape[1:]).mean(dim=1)
