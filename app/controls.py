"""A method option's control, generated from its declaration (core.pet.options): the app names
no method and no option, so a method registered anywhere gets its controls here; and the
numbers an API client sends, read with a clear message when they are not numbers."""
from __future__ import annotations

import math
from typing import Any, Optional

import gradio as gr


def number_field(component: gr.components.Component) -> gr.components.Component:
    """`component` (a gr.Number or gr.Slider) refusing by its label what an API client sends that it
    cannot take: Gradio's own preprocessing compares a non-number with the bounds (a bare TypeError)
    and says a number out of range without naming the field. Set on the instance, since a subclass of
    a Gradio component writes a stub file beside this module on import."""
    given = component.preprocess

    def preprocess(payload: Any) -> Any:
        return given(_number_sent(component, payload))

    component.preprocess = preprocess
    return component


def _number_sent(component: gr.components.Component, payload: Any) -> Any:
    name = component.label or "a number field"
    if payload is None and isinstance(component, gr.Number):
        return None   # an emptied field
    if isinstance(payload, bool) or not isinstance(payload, (int, float)):   # float(True) is 1.0: not meant
        raise gr.Error(f"{name} must be a number, not {_shown(payload)}")
    try:
        finite = math.isfinite(payload)
    except OverflowError:   # an int past any float
        finite = False
    if not finite:
        raise gr.Error(f"{name} must be a finite number, not {_shown(payload)}")
    if getattr(component, "precision", None) == 0 and payload != int(payload):   # Gradio would round it
        raise gr.Error(f"{name} must be a whole number, not {_shown(payload)}")
    low, high = component.minimum, component.maximum
    if (low is not None and payload < low) or (high is not None and payload > high):
        bounds = (f"between {low:g} and {high:g}" if low is not None and high is not None
                  else f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise gr.Error(f"{name} must be {bounds}, not {_shown(payload)}")
    return payload


def _shown(value: Any, limit: int = 40) -> str:
    """`value` as the client sent it, cut with an ellipsis past `limit` characters (a 10**50 is not
    the 40 digits it would read as cut)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def control(spec: dict[str, Any]) -> gr.components.Component:
    """The control for one declared option: its help is the label, its range or choices bound it."""
    if spec["type"] == "bool":
        return gr.Checkbox(spec["default"], label=spec["help"])
    if spec["choices"] is not None:
        return gr.Radio(list(spec["choices"]), value=spec["default"], label=spec["help"])
    if spec["type"] == "int" and spec["low"] is not None:
        return number_field(gr.Slider(spec["low"], spec["high"], value=spec["default"], step=1, label=spec["help"]))
    if spec["type"] in ("int", "float"):
        return number_field(gr.Number(spec["default"], minimum=spec["low"], maximum=spec["high"], label=spec["help"]))
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
        raise gr.Error(f"{name} must be a number, not {_shown(value)}") from error
    if value != value or value in (float("inf"), float("-inf")):
        raise gr.Error(f"{name} must be a finite number, not {value}")
    return value


def whole(value: Any, name: str) -> int:
    """A whole number an API client sent (None or empty: 0), or a clear error."""
    given = number(value, name) or 0.0
    if given != int(given):
        raise gr.Error(f"{name} must be a whole number, not {_shown(given)}")
    return int(given)
