"""PET methods: one module per method, each declaring a `Config` of self-describing options
(core.pet.options), an `attach(backbone, config) -> PetHandle`, and registering itself
(core.pet.registry) with its label, default learning rate and figure. Importing this package
registers every bundled method, in the order the app lists them; a new method is one module
plus one name in the import below."""
from __future__ import annotations

import dataclasses
from typing import Any

from core.pet import (aurora, vlpet, lora, adapter, prompt, bitfit, linear_probe, prolip, full,  # noqa: F401
                      zero_shot)   # (they register)
from core.pet.handle import PetError, PetHandle
from core.pet.options import OptionError, check
from core.pet.registry import METHODS, Method, register, unregister

__all__ = ["METHODS", "Method", "PetError", "PetHandle", "attach", "config_to_dict", "default_lr", "get_method",
           "make_config", "register", "unregister"]


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise PetError(f"unknown method '{str(name)[:60]}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_config(method: str, options: dict[str, Any] | None = None) -> Any:
    """The method's config from plain options (from JSON, the CLI or the app), each checked
    against its declared type and range; unknown keys are errors."""
    if not isinstance(method, str):
        raise PetError(f"a method must be named by a text, not {method!r:.60}")
    declared = {spec["name"]: spec for spec in get_method(method).options()}
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise PetError(f"the options of {method} must be a JSON object of option: value, not {options!r:.60}")
    unknown = sorted(str(k)[:40] for k in set(options) - set(declared))
    if unknown:
        raise PetError(f"method {method} has no option {', '.join(unknown)} "
                       f"(options: {', '.join(declared) or 'none'})")
    try:
        return get_method(method).config(**{key: check(method, declared[key], value) for key, value in options.items()})
    except OptionError as error:
        raise PetError(str(error)) from error


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def default_lr(method: str) -> float:
    return get_method(method).default_lr


def attach(backbone, method: str, options: dict[str, Any] | Any | None = None) -> PetHandle:
    config = options if dataclasses.is_dataclass(options) else make_config(method, options)
    if backbone.pet is not None:
        raise PetError("a method is already attached to this backbone: detach it first")
    return get_method(method).attach(backbone, config)
