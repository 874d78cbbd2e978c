"""Linear probe / projection-only: tune the two output projections into the joint space."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PetHandle, PetError
from core.pet.registry import Method, register


@dataclass
class Config:
    pass


def attach(backbone, config: Config) -> PetHandle:
    heads = [p for t in backbone.towers.values() for p in t.output_parameters]
    if not heads:
        raise PetError(f"{backbone.spec} has no output projections to tune")
    return PetHandle(backbone, "linear_probe", config, tuned_backbone_params=heads, group=lambda n: "heads")


register(Method(
    name="linear_probe", label="Linear probe", default_lr=1e-3, config=Config, attach=attach,
    trains="the two output projections into the joint space"))
