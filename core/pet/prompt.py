"""Deep prompt tuning (CoOp / VPT-deep / IVLP style): `length` learnable tokens inserted after
[CLS] (vision) or the start token (text) and replaced at each of the first `depth` layers.
The towers remove them before pooling, so CLIP's EOT pooling and causal mask stay right."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.pet.handle import PetError, PetHandle, resolve_towers
from core.pet.registry import Method, register
from core.pet.options import option


@dataclass
class Config:
    length: int = option(4, "prompt tokens per layer", 1, 64, main=True)
    depth: int = option(9, "layers that get prompts, from the first", 1, 64)
    towers: tuple[str, ...] = option((), "towers that get prompts (empty: every tower)")


def attach(backbone, config: Config) -> PetHandle:
    handle = PetHandle(backbone, "prompt", config, group=lambda n: "prompts")
    towers = resolve_towers(backbone, config.towers)
    for name in towers:
        if backbone.towers[name].prompt_slot is None:
            raise PetError(f"prompt tuning is not available on the {name} tower of {backbone.spec}")
    prompts = nn.ParameterDict()
    for name in towers:
        tower = backbone.towers[name]
        prompts[name] = nn.Parameter(torch.randn(min(config.depth, tower.depth), config.length, tower.width) * 0.02)
    handle.install(prompts)
    for name in towers:
        table = prompts[name]
        backbone.towers[name].prompts = lambda layer, table=table: table[layer] if layer < table.shape[0] else None
    handle.on_detach(lambda: [setattr(backbone.towers[n], "prompts", None) for n in towers])
    return handle


register(Method(
    name="prompt", label="Deep prompt tuning", default_lr=2e-3, config=Config, attach=attach,
    trains="learnable tokens after [CLS] / the start token in the first layers"))
