"""Full fine-tuning: every backbone weight, at a low learning rate."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PetHandle

DEFAULT_LR = 1e-5


@dataclass
class Config:
    pass


def attach(backbone, config: Config) -> PetHandle:
    return PetHandle(backbone, "full", config, tuned_backbone_params=backbone.backbone_parameters().values(),
                     group=lambda n: "backbone")
