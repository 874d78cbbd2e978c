"""ProLIP (Fahes et al., "Fine-tuning CLIP's last visual projector: a few-shot cornucopia", 2024):
only the vision tower's output projection is tuned, pulled toward its pretrained value by
λ‖W − W₀‖² with λ = 1/N (N training items) — validation-free, and stable across learning rates.
Authors' code: astra-vision/ProLIP (methods/ProLIP.py)."""
from __future__ import annotations

from dataclasses import dataclass

from core.pet.handle import PULL_HELP, PetError, PetHandle
from core.pet.options import option
from core.pet.registry import Method, register
from core.result import Recipe

@dataclass
class Config:
    pull: float = option(1.0, PULL_HELP, low=0.0, high=1000.0, main=True)


def attach(backbone, config: Config) -> PetHandle:
    projection = list(backbone.towers["vision"].output_parameters) if "vision" in backbone.towers else []
    if not projection:
        raise PetError(f"{backbone.spec} has no vision output projection to tune")
    weights = [p for p in projection if p.ndim >= 2]   # the authors leave a projection's bias frozen
    handle = PetHandle(backbone, "prolip", config, tuned_backbone_params=weights, group=lambda n: "vision projection")
    handle.pull_toward_pretrained(config.pull, weights)
    return handle


def _authors_recipe(setting) -> Recipe:
    # Their validation-free runs: Adam at 1e-5 (eps 1e-4), cosine from the first step, λ = 1/N.
    return Recipe("authors", "Fahes et al. 2024 (astra-vision/ProLIP, configs/experiments/"
                             "few_shot_no_val_lr1e-5_lambda_1_N.yaml)", options={"pull": 1.0}, lr=1e-5, warmup=0.0)


register(Method(
    name="prolip", label="ProLIP (pulled visual projection)", default_lr=1e-3, config=Config, attach=attach,
    trains="the vision output projection, pulled toward its pretrained value", authors_recipe=_authors_recipe))
