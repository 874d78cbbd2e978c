"""A method option's control, generated from its declaration (core.pet.options): the app names
no method and no option, so a method registered anywhere gets its controls here; and the
numbers an API client sends, read with a clear message when they are not numbers."""
from __future__ import annotations

from typing import Any, Optional

import math

import gradio as gr


def _number_sent(component: gr.components.Component, payload: Any) -> Any:
    """What an API client sent a number field, refused with the field's name when it is not a finite
    number: Gradio's own preprocessing compares it with the bounds and raises a bare TypeError."""
    if payload is None or (isinstance(payload, (int, float)) and not isinstance(payload, bool)
                           and math.isfinite(payload)):
        return payload
    raise gr.Error(f"{component.label or 'a number field'} must be a finite number, not {payload!r:.40}")


class Number(gr.Number):
    """gr.Number (the same control in the page) whose API value is checked before its bounds."""
    is_template = True   # Gradio draws a template with its parent's component

    def preprocess(self, payload: Any) -> Any:
        return super().preprocess(_number_sent(self, payload))


class Slider(gr.Slider):
    """gr.Slider (the same control in the page) whose API value is checked before its bounds."""
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return super().preprocess(_number_sent(self, payload))


def control(spec: dict[str, Any]) -> gr.components.Component:
    """The control for one declared option: its help is the label, its range or choices bound it."""
    if spec["type"] == "bool":
        return gr.Checkbox(spec["default"], label=spec["help"])
    if spec["choices"] is not None:
        return gr.Radio(list(spec["choices"]), value=spec["default"], label=spec["help"])
    if spec["type"] == "int" and spec["low"] is not None:
        return Slider(spec["low"], spec["high"], value=spec["default"], step=1, label=spec["help"])
    if spec["type"] in ("int", "float"):
        return Number(spec["default"], minimum=spec["low"], maximum=spec["high"], label=spec["help"])
    if spec["type"] == "names":
        return gr.Textbox(",".join(spec["default"]), label=f"{spec['help']} (comma-separated)")
    return gr.Textbox(spec["default"], label=spec["help"])


def option_value(spec: dict[str, Any], value: Any) -> Any:
    """A control's value as the option's type (sliders and numbers give floats, texts give names)."""
    if spec["type"] == "int":
        return int(value)
    if spec["type"] == "names":
        return [name.strip() for name in (value or "").split(",") if name.strip()]
    return value


def options_by_method(controls: list, values: list) -> dict[str, dict[str, Any]]:
    """Every method's main options as its controls are set: {method: {option: value}}."""
    options: dict[str, dict[str, Any]] = {}
    for (method, spec, _), value in zip(controls, values):
        options.setdefault(method, {})[spec["name"]] = option_value(spec, value)
    return options


def number(value: Any, name: str) -> Optional[float]:
    """A number an API client sent (None or empty: not given), or a clear error."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):   # float(True) is 1.0: a client's mistake, not a number it meant
        raise gr.Error(f"{name} must be a number, not {value}")
    try:
        value = float(value)
    except (TypeError, ValueError) as error:
        raise gr.Error(f"{name} must be a number, not {value!r:.40}") from error
    if value != value or value in (float("inf"), float("-inf")):
        raise gr.Error(f"{name} must be a finite number, not {value}")
    return value


def whole(value: Any, name: str) -> int:
    """A whole number an API client sent (None or empty: 0), or a clear error."""
    given = number(value, name) or 0.0
    if given != int(given):
        raise gr.Error(f"{name} must be a whole number, not {given:g}")
    return int(given)
