"""Bottleneck adapter (Houlsby / VL-Adapter): Y = H + W_up GELU(W_down H) on sub-layer outputs,
no gates. W_up starts at zero, so the tuned model starts equal to the frozen one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from core.pet.handle import PetHandle, attach_site_combiners
from core.pet.registry import Method, register
from core.pet.options import option


@dataclass
class Config:
    reduction: int = option(8, "bottleneck = width / reduction", 1, 1024, main=True)
    towers: tuple[str, ...] = option((), "towers to adapt (empty: every tower)")
    sites: tuple[str, ...] = option(("attn", "mlp"), "residual sites that get an adapter")


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        return x + h + self.up(nn.functional.gelu(self.down(h)))


def attach(backbone, config: Config) -> PetHandle:
    handle = PetHandle(backbone, "adapter", config, group=lambda n: "adapters")
    handle.install(attach_site_combiners(
        handle, config.towers, config.sites,
        lambda tower, block, name: Bottleneck(block.width, max(1, block.width // config.reduction))))
    return handle


register(Method(
    name="adapter", label="Bottleneck adapter", default_lr=1e-3, config=Config, attach=attach,
    trains="H + W_up·GELU(W_down·H) after each sub-layer"))
