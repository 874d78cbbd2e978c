"""LoRA: Δ(x) = (α/r) · B A dropout(x) on chosen projections (CLIP-LoRA defaults: q, k, v of
both towers, r = 2, α = 1, dropout 0.25). Linear in the weights, so it merges: W += (α/r) B A."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from core.pet.handle import PetHandle, attach_projection_deltas
from core.pet.registry import Method, register
from core.pet.options import option


@dataclass
class Config:
    rank: int = option(2, "r, the rank of B A", 1, 256, main=True)
    alpha: float = option(1.0, "α: the delta is scaled by α / r", 0.0, 1e4)
    dropout: float = option(0.25, "dropout on the delta's input", 0.0, 0.9)
    towers: tuple[str, ...] = option((), "towers to adapt (empty: every tower)")
    projections: tuple[str, ...] = option(("q", "k", "v"), "projections to adapt")


class LowRankDelta(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # zero: starts at the frozen model
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) @ self.down.T.to(x.dtype) @ self.up.T.to(x.dtype) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.up @ self.down * self.scale


class LoraHandle(PetHandle):
    mergeable = True

    def linear_deltas(self):
        return [(self.backbone.towers[tower].blocks[int(index)].projections[name], delta)
                for tower, blocks in self.backbone.pet.items()
                for index, deltas in blocks.items() for name, delta in deltas.items()]


def attach(backbone, config: Config) -> LoraHandle:
    handle = LoraHandle(backbone, "lora", config, group=lambda n: "lora")
    handle.install(attach_projection_deltas(
        handle, config.towers, config.projections,
        lambda tower, block, name: LowRankDelta(block.projections[name].in_features,
                                                block.projections[name].out_features,
                                                config.rank, config.alpha, config.dropout)))
    return handle


register(Method(
    name="lora", label="LoRA", default_lr=2e-4, config=Config, attach=attach,
    trains="ΔW = (α/r)·BA on chosen projections"))
