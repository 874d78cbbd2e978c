"""Zero-shot: the frozen backbone, nothing trained."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PetHandle

DEFAULT_LR = 0.0


@dataclass
class Config:
    pass


def attach(backbone, config: Config) -> PetHandle:
    return PetHandle(backbone, "zero_shot", config)
