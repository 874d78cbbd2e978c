"""Recipes: `studio` (the defaults) and `authors` (what a method's authors ran for this backbone,
task and media), in runs, sweeps, run.json and the CLI."""
import json

import pytest

from core import checkpoint
from core.cli import main
from core.pet import METHODS, PetError, attach
from core.pet.recipes import Setting, recipe_for
from core.runs import tune
from core.sweep import parse_methods, sweep
from tests.conftest import TINY


def _setting(backbone, task="retrieval", video=False):
    return Setting.of(backbone, task, video)


def test_aurora_authors_recipe_follows_backbone_task_and_media(tiny, tiny_blip):
    clip = recipe_for("authors", METHODS["aurora"], _setting(tiny))
    assert clip.options == {"gqt": True, "rank": 32} and clip.lr == 1e-4 and clip.warmup == 0.0
    blip = recipe_for("authors", METHODS["aurora"], _setting(tiny_blip))
    assert blip.options == {"gqt": True, "rank": 32, "ice": True, "heads": True}
    video = recipe_for("authors", METHODS["aurora"], _setting(tiny_blip, video=True))
    assert video.options["rank"] == 64
    studio = recipe_for("studio", METHODS["aurora"], _setting(tiny_blip))
    assert studio.options == {} and studio.lr is None and studio.warmup is None


def test_a_method_without_an_authors_recipe_keeps_its_defaults_and_says_so(tiny):
    recipe = recipe_for("authors", METHODS["bitfit"], _setting(tiny))
    assert recipe.options == {} and recipe.lr is None and "no recipe of its authors" in recipe.source
    with pytest.raises(PetError, match="unknown recipe 'chef'"):
        recipe_for("chef", METHODS["aurora"], _setting(tiny))


def test_the_authors_recipe_on_blip_tunes_what_the_authors_tune(tiny_blip):
    recipe = recipe_for("authors", METHODS["aurora"], _setting(tiny_blip))
    handle = attach(tiny_blip, "aurora", recipe.options)
    groups = handle.budget()
    assert set(groups) == {"shared", "modes", "gqt", "heads"}
    heads = sum(p.numel() for p in tiny_blip.head_parameters())
    assert groups["heads"] == heads and heads > 0
    handle.detach()


def test_a_run_records_its_recipe_and_the_users_choices_win(shapes, tmp_path):
    result = tune(TINY, shapes, "aurora", {"rank": 8}, shots=4, epochs=1, seed=0, out=tmp_path / "authors",
                  recipe="authors")
    assert result.config["rank"] == 8 and result.config["gqt"] is True        # the user's rank, the recipe's GQT
    assert result.train.lr == 1e-4 and result.train.warmup == 0.0
    saved, _ = checkpoint.read(tmp_path / "authors")
    assert saved.recipe.name == "authors" and saved.recipe.options == {"gqt": True, "rank": 32}
    assert saved.recipe.lr == 1e-4 and saved.train.warmup == 0.0
    own_lr = tune(TINY, shapes, "aurora", {}, shots=4, epochs=1, lr=3e-3, seed=0, out=tmp_path / "own", recipe="authors")
    assert own_lr.train.lr == 3e-3 and own_lr.config["rank"] == 32
    studio = tune(TINY, shapes, "aurora", {}, shots=4, epochs=1, seed=0, out=tmp_path / "studio")
    assert studio.recipe.name == "studio" and studio.config["gqt"] is False and studio.train.warmup == 0.1
    with pytest.raises(PetError, match="unknown recipe"):
        tune(TINY, shapes, "aurora", {}, epochs=1, out=tmp_path / "never", recipe="chef")
    assert not (tmp_path / "never").exists()


def test_run_json_before_recipes_still_reads(shapes, tmp_path):
    tune(TINY, shapes, "bitfit", {}, shots=4, epochs=1, seed=0, out=tmp_path / "run")
    info = json.loads((tmp_path / "run" / checkpoint.RUN_INFO).read_text())
    del info["recipe"], info["train"]["warmup"], info["train"]["weight_decay"]
    (tmp_path / "run" / checkpoint.RUN_INFO).write_text(json.dumps(info))
    saved, _ = checkpoint.read(tmp_path / "run")
    assert saved.recipe is None and saved.train.warmup == 0.1


def test_a_sweep_runs_every_method_from_the_recipe_and_says_how_to_reproduce_it(shapes, tmp_path):
    result = sweep(TINY, shapes, parse_methods("aurora,bitfit"), [0], tmp_path / "sweep", shots=4, epochs=1,
                   recipe="authors")
    assert result.recipe == "authors" and result.command.endswith("--recipe authors")
    aurora = checkpoint.read(result.methods[0].runs[0])[0]
    assert aurora.config["gqt"] is True and aurora.train.lr == 1e-4


def test_cli_info_reports_the_recipes_budget_and_learning_rate(capsys):
    assert main(["info", "--model", TINY, "--method", "aurora", "--recipe", "authors", "--video", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["recipe"]["options"] == {"gqt": True, "rank": 64} and info["lr"] == 1e-4
    # C 64³ + vision U,V 2·64·64 + text U,V 2·48·64 + 12 mode vectors × 4 blocks × 64 + GQT 2·2·48
    assert info["groups"] == {"shared": 64 ** 3 + 2 * 64 * 64 + 2 * 48 * 64, "modes": 12 * 4 * 64, "gqt": 2 * 2 * 48}


def test_weights_tuned_by_another_revision_of_a_method_are_refused(shapes, tmp_path):
    """Aurora's MLP layout changed (revision 2): weights saved before would compute another
    function under the same names and shapes, so they are refused with the reason."""
    from core.checkpoint import CheckpointError
    from core.runs import load_run

    tune(TINY, shapes, "aurora", {"rank": 4}, shots=4, epochs=1, seed=0, out=tmp_path / "run")
    info_file = tmp_path / "run" / checkpoint.RUN_INFO
    info = json.loads(info_file.read_text())
    assert info["method_revision"] == METHODS["aurora"].revision == 2
    _, handle, _ = load_run(TINY, tmp_path / "run")
    handle.detach()
    del info["method_revision"]             # as run.json was written before revisions
    info_file.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="tuned by another version of aurora .*all four modes"):
        load_run(TINY, tmp_path / "run")
