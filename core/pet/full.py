"""Full fine-tuning: every backbone weight, at a low learning rate."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PULL_HELP, PetHandle
from core.pet.options import option
from core.pet.registry import Method, register


@dataclass
class Config:
    pull: float = option(0.0, PULL_HELP, low=0.0, high=1000.0, main=True)


def attach(backbone, config: Config) -> PetHandle:
    weights = list(backbone.backbone_parameters().values())
    handle = PetHandle(backbone, "full", config, tuned_backbone_params=weights, group=lambda n: "backbone")
    handle.pull_toward_pretrained(config.pull, weights)
    return handle


register(Method(
    name="full", label="Full fine-tuning", default_lr=1e-5, config=Config, attach=attach,
    trains="every weight"))
