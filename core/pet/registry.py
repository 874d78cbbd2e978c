"""The method registry. Every PET method describes itself once — its name and label, what it
trains, its Config (options with help and ranges, see core.pet.options), its default learning
rate, how it attaches, the figure that shows its readout and, for a method from a paper, its
authors' recipe (core.pet.recipes) — and registers itself with
`register`. The CLI's flags, the app's method choices and controls, `info` and the figures are
all built from these declarations, so adding a method touches only its own module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from core.pet.options import describe


@dataclass(frozen=True)
class Method:
    name: str                        # the CLI's --method and run.json's "method"
    label: str                       # how the app names it
    trains: str                      # what is trained, in a few words
    config: type                     # a dataclass whose fields are core.pet.options.option(...)
    attach: Callable[[Any, Any], Any]   # (backbone, config) -> PetHandle
    default_lr: float
    figure: Optional[Callable[[Any, dict], Any]] = None   # (config, readout) -> plotly figure of what it learned
    authors_recipe: Optional[Callable[[Any], Any]] = None   # (recipes.Setting) -> recipes.Recipe: what they ran
    # Raised when the same weights would compute something else; runs saved at another revision
    # are refused on load, with `revised` (what the latest revision changed) as the reason.
    revision: int = 1
    revised: str = ""

    def options(self) -> list[dict[str, Any]]:
        """Its options as declared: name, type, default, help, low, high, choices, main."""
        return describe(self.config)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` known everywhere (the CLI, the app, runs); names are unique."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name} is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)
