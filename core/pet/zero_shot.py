"""Zero-shot: the frozen backbone, nothing trained."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PetHandle
from core.pet.registry import Method, register


@dataclass
class Config:
    pass


def attach(backbone, config: Config) -> PetHandle:
    return PetHandle(backbone, "zero_shot", config)


register(Method(
    name="zero_shot", label="Zero-shot (no tuning)", default_lr=0.0, config=Config, attach=attach,
    trains="nothing: the frozen backbone"))
