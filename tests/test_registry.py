"""Methods describe themselves: one registered from this test alone, with one knob, appears in
`python -m core info`, as a CLI flag, and in the app's method choices with its control."""
import json
from dataclasses import dataclass

import gradio as gr
import pytest
import torch
from torch import nn

from core.cli import main
from core.pet import METHODS, Method, PetHandle, make_config, register, unregister
from core.pet.options import option
from tests.conftest import TINY

KNOB_HELP = "how far the throwaway shifts the logit scale"


@dataclass
class ThrowawayConfig:
    shift: float = option(0.5, KNOB_HELP, 0.0, 2.0, main=True)


def attach_throwaway(backbone, config: ThrowawayConfig) -> PetHandle:
    handle = PetHandle(backbone, "throwaway", config, group=lambda name: "shift")
    handle.install(nn.ParameterDict({"shift": nn.Parameter(torch.tensor([config.shift]))}))
    return handle


@pytest.fixture
def throwaway():
    method = register(Method(name="throwaway", label="Throwaway (a test's own method)", trains="one scalar",
                             config=ThrowawayConfig, attach=attach_throwaway, default_lr=1e-2))
    yield method
    unregister("throwaway")


def test_a_method_registered_elsewhere_is_known_to_the_cli(throwaway, capsys):
    assert main(["info", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["methods"]}
    assert listed["throwaway"]["label"] == "Throwaway (a test's own method)"
    assert listed["throwaway"]["options"] == [{"name": "shift", "type": "float", "default": 0.5, "help": KNOB_HELP,
                                               "low": 0.0, "high": 2.0, "choices": None, "main": True}]
    assert main(["info", "--model", TINY, "--method", "throwaway", "--shift", "1.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["trainable_params"] == 1 and info["groups"] == {"shift": 1}
    assert main(["info", "--model", TINY, "--method", "throwaway", "--shift", "3", "--json"]) == 2
    assert json.loads(capsys.readouterr().out.strip())["error"] == \
        "throwaway option shift must be between 0 and 2, not 3.0"
    assert main(["tune", "--help"]) == 0
    flags = " ".join(capsys.readouterr().out.split())   # argparse wraps the help text
    assert f"--shift OPTION_SHIFT {KNOB_HELP}, 0–2 [throwaway]" in flags


def test_a_method_registered_elsewhere_gets_its_app_choice_and_control(throwaway):
    from app.ui import build_demo

    demo = build_demo()
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Method"]
    assert ("Throwaway (a test's own method)", "throwaway") in [tuple(c) for c in dropdowns[0].choices]
    knob = [b for b in demo.blocks.values() if getattr(b, "label", None) == KNOB_HELP]
    assert len(knob) == 1 and isinstance(knob[0], gr.Number) and knob[0].value == 0.5
    assert (knob[0].minimum, knob[0].maximum) == (0.0, 2.0)


def test_registered_names_are_unique_and_options_are_checked(throwaway):
    with pytest.raises(ValueError, match="a method named throwaway is already registered"):
        register(throwaway)
    assert make_config("throwaway", {"shift": 1}).shift == 1.0
    assert list(METHODS)[:2] == ["aurora", "vlpet"]
