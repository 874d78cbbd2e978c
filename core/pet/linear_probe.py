"""Linear probe / projection-only: tune the two output projections into the joint space."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PULL_HELP, PetHandle, PetError
from core.pet.options import option
from core.pet.registry import Method, register


@dataclass
class Config:
    pull: float = option(0.0, PULL_HELP, low=0.0, high=1000.0, main=True)


def attach(backbone, config: Config) -> PetHandle:
    heads = [p for t in backbone.towers.values() for p in t.output_parameters]
    if not heads:
        raise PetError(f"{backbone.spec} has no output projections to tune")
    handle = PetHandle(backbone, "linear_probe", config, tuned_backbone_params=heads, group=lambda n: "heads")
    handle.pull_toward_pretrained(config.pull, heads)
    return handle


register(Method(
    name="linear_probe", label="Linear probe", default_lr=1e-3, config=Config, attach=attach,
    trains="the two output projections into the joint space"))
