"""The one interface every backbone family implements."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from core.backbones.layout import TowerLayout


class BackboneError(ValueError):
    """A backbone spec that cannot be loaded, with a message meant for the user.

    `unreachable` marks weights that could not be fetched (no network, hub down): the case
    in which callers may fall back to the bundled offline model."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


class Backbone(nn.Module):
    """A dual-encoder vision-language model seen through its tower layouts.

    Subclasses set `spec`, `family`, `weights` (a sentence saying where the weights came
    from, e.g. "random init (seed 0): no pretrained weights"), `towers` and `image_transform`,
    and implement `encode_image`, `encode_text` and `tokenize`. A PET method's own parameters
    live under the submodule `pet`, so `.to(device)` and DDP see them with the backbone's.
    """

    spec: str
    family: str
    weights: str
    towers: dict[str, TowerLayout]
    image_transform: Callable
    seed: int
    supports_matching = False   # True for families with an image-text matching head (BLIP's ITM)
    answers_by_generation = False   # True for families whose VQA generates answers (BLIP VQA)
    tasks = ("retrieval", "vqa")    # the tasks this backbone serves

    def __init__(self):
        super().__init__()
        self.pet: Optional[nn.Module] = None
        self.fallback_note: Optional[str] = None   # set when this model stands in for an unreachable one

    @property
    def pretrained(self) -> bool:
        return not self.weights.startswith("random init")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def backbone_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("pet.")}

    def num_backbone_params(self) -> int:
        return sum(p.numel() for p in self.backbone_parameters().values())

    def head_parameters(self) -> list[nn.Parameter]:
        """The task heads a method may tune besides its own parameters (Aurora's `heads`)."""
        return list(self.towers["vision"].output_parameters)

    def patch_grid(self) -> tuple[int, int, int]:
        """(rows, cols, prefix): vision tokens are `prefix` tokens ([CLS]) then rows × cols patches."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def cut_by_tokenizer(self, texts: list[str]) -> list[bool]:
        """Whether each text fills the tokenizer's whole context, i.e. was (or may have been) cut to fit."""
        tokens = self.tokenize(texts)
        return ((tokens != self.pad_id).sum(dim=1) >= tokens.shape[1]).tolist()

    def run_towers(self, pixels: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> None:
        """One forward pass through the towers a picture and a text go through (for gate readouts)."""
        if pixels is not None:
            self.encode_image(pixels)
        if tokens is not None:
            self.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.spec} — {self.weights}"
