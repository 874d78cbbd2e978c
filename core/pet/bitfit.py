"""BitFit: tune every bias term of the backbone (projections and LayerNorms), nothing else."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PetHandle
from core.pet.registry import Method, register


@dataclass
class Config:
    pass


def attach(backbone, config: Config) -> PetHandle:
    biases = [p for n, p in backbone.backbone_parameters().items() if n.rsplit(".", 1)[-1] == "bias"]
    return PetHandle(backbone, "bitfit", config, tuned_backbone_params=biases, group=lambda n: "biases")


register(Method(
    name="bitfit", label="BitFit", default_lr=1e-3, config=Config, attach=attach,
    trains="every bias (projections and LayerNorms)"))
