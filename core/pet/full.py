"""Full fine-tuning: every backbone weight, at a low learning rate."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PetHandle
from core.pet.registry import Method, register


@dataclass
class Config:
    pass


def attach(backbone, config: Config) -> PetHandle:
    return PetHandle(backbone, "full", config, tuned_backbone_params=backbone.backbone_parameters().values(),
                     group=lambda n: "backbone")


register(Method(
    name="full", label="Full fine-tuning", default_lr=1e-5, config=Config, attach=attach,
    trains="every weight"))
