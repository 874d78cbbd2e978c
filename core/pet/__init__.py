"""PET methods: one module per method, each with a `Config` dataclass, a `DEFAULT_LR` and one
`attach(backbone, config) -> PetHandle`."""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from core.pet import adapter, aurora, bitfit, full, linear_probe, lora, prompt, vlpet, zero_shot
from core.pet.handle import PetError, PetHandle
from core.pet.options import OptionError, check, describe

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
        raise PetError(f"unknown method '{str(name)[:60]}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_config(method: str, options: dict[str, Any] | None = None) -> Any:
    """The method's config from plain options (from JSON, the CLI or the app), each checked
    against its declared type and range; unknown keys are errors."""
    if not isinstance(method, str):
        raise PetError(f"a method must be named by a text, not {method!r:.60}")
    config_cls = _method(method).Config
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise PetError(f"the options of {method} must be a JSON object of option: value, not {options!r:.60}")
    declared = {spec["name"]: spec for spec in describe(config_cls)}
    unknown = sorted(str(k)[:40] for k in set(options) - set(declared))
    if unknown:
        raise PetError(f"method {method} has no option {', '.join(unknown)} "
                       f"(options: {', '.join(declared) or 'none'})")
    try:
        return config_cls(**{key: check(method, declared[key], value) for key, value in options.items()})
    except OptionError as error:
        raise PetError(str(error)) from error


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def default_lr(method: str) -> float:
    return _method(method).DEFAULT_LR


def attach(backbone, method: str, options: dict[str, Any] | Any | None = None) -> PetHandle:
    config = options if dataclasses.is_dataclass(options) else make_config(method, options)
    if backbone.pet is not None:
        raise PetError("a method is already attached to this backbone: detach it first")
    return _method(method).attach(backbone, config)
