"""ProLIP (the vision projection alone, pulled toward its pretrained value) and the pull as an
option of the linear probe and full fine-tuning."""
import json

import pytest
import torch

from core.backbones import load_backbone
from core.cli import main
from core.pet import PetError, attach, make_config
from core.pet.handle import PulledObjective
from core.runs import tune
from core.sweep import parse_methods
from tests.conftest import TINY


def test_prolip_trains_the_vision_projection_alone(tiny):
    handle = attach(tiny, "prolip", {})
    trainable = handle.trainable_parameters()
    assert list(trainable) == ["model.visual.proj"]
    assert handle.num_trainable() == tiny.towers["vision"].output_parameters[0].numel()
    assert handle.pull == 1.0 and handle.budget() == {"vision projection": handle.num_trainable()}
    with pytest.raises(PetError, match="pull must be between 0 and 1000"):
        make_config("prolip", {"pull": -1})


def test_the_pull_adds_its_strength_over_n_times_the_squared_distance(tiny):
    handle = attach(tiny, "linear_probe", {"pull": 2.0})
    heads = list(handle.trainable_parameters().values())
    base = torch.nn.Module()
    base.forward = lambda batch: torch.tensor(0.5)
    pulled = handle.pulled(base, items=8)
    assert isinstance(pulled, PulledObjective) and float(pulled(None).detach()) == pytest.approx(0.5)   # at W₀: 0
    with torch.no_grad():
        heads[0].add_(0.1)
    expected = 0.5 + 2.0 / 8 * 0.01 * heads[0].numel()
    assert float(pulled(None).detach()) == pytest.approx(expected, rel=1e-4)
    # the guard reads the objective's own numbers through the pull
    base.last_spread, base.last_media_spread, base.chance_loss = torch.tensor(2.0), torch.tensor(0.25), 1.5
    assert (float(pulled.last_spread), float(pulled.last_media_spread), pulled.chance_loss) == (2.0, 0.25, 1.5)
    unpulled = attach(load_backbone(TINY, seed=0), "linear_probe", {})
    assert unpulled.pull == 0 and unpulled.pulled(base, items=8) is base


def _distance(folder, backbone_seed=0):
    """How far the run's tuned vision projection moved from the untuned one."""
    from safetensors.torch import load_file

    original = load_backbone(TINY, seed=backbone_seed).towers["vision"].output_parameters[0]
    tuned = load_file(str(folder / "pet.safetensors"))
    return float((tuned["model.visual.proj"] - original).detach().norm())


def test_a_stronger_pull_keeps_the_projection_nearer_its_pretrained_value(shapes, tmp_path):
    # a rate and pull the guard leaves alone: at 3e-2, or with a pull of 1000 even at 3e-3, AdamW's
    # steps overshoot the pull, the pulled loss climbs, and the guard restarts the run
    runs = {pull: tune(TINY, shapes, "prolip", {"pull": pull}, shots=8, epochs=3, batch_size=8, lr=3e-3,
                       out=tmp_path / f"pull-{pull}") for pull in (0.0, 100.0)}
    assert [r.train.restarts for r in runs.values()] == [[], []]
    free, held = (_distance(tmp_path / f"pull-{p}") for p in (0.0, 100.0))
    assert held < 0.5 * free and free > 0
    assert runs[100.0].train.weight_decay == 0.0   # the pull stands in for weight decay
    assert runs[100.0].trainable_params == runs[0.0].trainable_params


def test_prolip_and_the_pull_take_part_in_sweeps_and_recipes(capsys):
    (prolip, probe, full) = parse_methods("prolip,linear_probe:pull=1,full:pull=0.5")
    assert (prolip.method, probe.options, full.options) == ("prolip", {"pull": 1}, {"pull": 0.5})
    assert main(["info", "--model", "offline", "--method", "prolip", "--recipe", "authors", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["lr"] == 1e-5 and info["recipe"]["options"] == {"pull": 1.0} and "ProLIP" in info["recipe"]["source"]
    assert info["trainable_params"] == 128 * 128   # the offline model's vision projection (width 128 → joint 128)
