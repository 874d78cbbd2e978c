"""PET methods: one module per method, each with a `Config` dataclass, a `DEFAULT_LR` and one
`attach(backbone, config) -> PetHandle`."""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from core.pet import adapter, aurora, bitfit, full, linear_probe, lora, prompt, vlpet, zero_shot
from core.pet.handle import PetError, PetHandle

METHODS: dict[str, ModuleType] = {
    "zero_shot": zero_shot,
    "linear_probe": linear_probe,
    "bitfit": bitfit,
    "lora": lora,
    "adapter": adapter,
    "prompt": prompt,
    "full": full,
    "aurora": aurora,
    "vlpet": vlpet,
}

__all__ = ["METHODS", "PetError", "PetHandle", "attach", "make_config", "config_to_dict"]


def _method(name: str) -> ModuleType:
    if name not in METHODS:
        raise PetError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_config(method: str, options: dict[str, Any] | None = None) -> Any:
    """The method's config from plain options (e.g. from JSON or the CLI); unknown keys are errors."""
    config_cls = _method(method).Config
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    options = dict(options or {})
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise PetError(f"method {method} has no option {', '.join(unknown)} "
                       f"(options: {', '.join(fields) or 'none'})")
    for key, value in options.items():
        if isinstance(value, list):
            options[key] = tuple(value)
    return config_cls(**options)


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def default_lr(method: str) -> float:
    return _method(method).DEFAULT_LR


def attach(backbone, method: str, options: dict[str, Any] | Any | None = None) -> PetHandle:
    config = options if dataclasses.is_dataclass(options) else make_config(method, options)
    if backbone.pet is not None:
        raise PetError("a method is already attached to this backbone: detach it first")
    return _method(method).attach(backbone, config)
