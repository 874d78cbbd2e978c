"""Recipes: whose settings a run starts from.

`studio` is PET Studio's defaults (each method's Config and suggested learning rate). `authors`
is what the method's authors ran — their options and training settings for this kind of backbone,
task and media — where a method declares it (`Method.authors_recipe`); a method without one keeps
its defaults under either recipe, and says so. Options and a learning rate the user gives always
win over the recipe's. run.json records the recipe a run used and what it set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.pet.handle import PetError
from core.result import Recipe

RECIPES = ("studio", "authors")


@dataclass(frozen=True)
class Setting:
    """What a recipe may depend on: the backbone (its family, towers and capabilities), the task
    and whether the dataset is video."""

    family: str
    towers: tuple[str, ...]
    capabilities: frozenset[str]
    task: str
    video: bool = False

    @classmethod
    def of(cls, backbone, task: str, video: bool = False) -> "Setting":
        return cls(family=backbone.family, towers=tuple(backbone.towers),
                   capabilities=frozenset(backbone.capabilities), task=task, video=video)

    @property
    def text_towers(self) -> tuple[str, ...]:
        return tuple(name for name in self.towers if name != "vision")


STUDIO_SOURCE = "PET Studio's defaults"


def check_recipe(name: Any) -> str:
    if not isinstance(name, str) or name not in RECIPES:
        raise PetError(f"unknown recipe '{str(name)[:40]}': choose one of {', '.join(RECIPES)}")
    return name


def recipe_for(name: str, method, setting: Setting) -> Recipe:
    """The recipe `name` for `method` (a registered Method) in `setting`."""
    if check_recipe(name) == "studio":
        return Recipe("studio", STUDIO_SOURCE)
    if method.authors_recipe is None:
        return Recipe("authors", f"{method.name} declares no recipe of its authors: {STUDIO_SOURCE}")
    return method.authors_recipe(setting)
