"""Method options that describe themselves: each Config field carries its help text and its
allowed range or choices, so plain options (from the CLI, the app or a run.json) are checked
against them before anything is built, with a message naming the option."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

MAX_NAMES = 16          # entries of a list option (towers, projections, sites)
MAX_NAME_LENGTH = 32


class OptionError(ValueError):
    """An option value of the wrong type or out of its range."""


def option(default: Any, help: str, low: Optional[float] = None, high: Optional[float] = None,
           choices: Optional[tuple] = None, main: bool = False) -> Any:
    """A Config field with its help text and its range [low, high] or its choices. `main`
    options get a control in the app; every option is a flag of the CLI."""
    metadata = {"help": help, "low": low, "high": high, "choices": choices, "main": main}
    if isinstance(default, tuple):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def describe(config_cls: type) -> list[dict[str, Any]]:
    """Each option: name, type (int, float, bool, str, names), default, help, low, high, choices, main."""
    hints = typing.get_type_hints(config_cls)
    described = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        described.append({"name": f.name, "type": _kind(hints[f.name]), "default": default,
                          "help": f.metadata.get("help", ""), "low": f.metadata.get("low"),
                          "high": f.metadata.get("high"), "choices": f.metadata.get("choices"),
                          "main": f.metadata.get("main", False)})
    return described


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "names"
    return hint.__name__


def check(method: str, spec: dict[str, Any], value: Any) -> Any:
    """`value` as the option's type, or OptionError saying what is wrong."""
    name, kind = spec["name"], spec["type"]
    where = f"{method} option {name}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise OptionError(f"{where} must be true or false, not {value!r:.60}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{where} must be a whole number, not {value!r:.60}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value in (float("inf"), float("-inf")):
            raise OptionError(f"{where} must be a finite number, not {value!r:.60}")
        try:
            value = float(value)
        except OverflowError:   # a whole number past any float
            raise OptionError(f"{where} must be a finite number, not {value!r:.60}") from None
    elif kind == "str":
        if not isinstance(value, str):
            raise OptionError(f"{where} must be a text, not {value!r:.60}")
    else:
        if not isinstance(value, (list, tuple)) or len(value) > MAX_NAMES or not all(
                isinstance(v, str) and 0 < len(v) <= MAX_NAME_LENGTH for v in value):
            raise OptionError(f"{where} must be a list of at most {MAX_NAMES} names, not {value!r:.60}")
        value = tuple(value)
    if spec["choices"] is not None and value not in spec["choices"]:
        raise OptionError(f"{where} must be one of {', '.join(map(str, spec['choices']))}, not {value!r:.60}")
    if spec["low"] is not None and not spec["low"] <= value <= spec["high"]:
        raise OptionError(f"{where} must be between {spec['low']:g} and {spec['high']:g}, not {value!r:.60}")
    return value
