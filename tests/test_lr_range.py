"""--lr auto: the range test that finds the learning rate on the training data (core.lr_range),
its cache, and what runs, the CLI and the figures say of it."""
import json
import math

import pytest
import torch
from torch import nn

from core.cli import main
from core.lr_range import ChoiceCache, choose_lr, pick, plan, rising_rates, turn
from core.result import LrChoice
from core.runs import tune
from core.trainer import TrainingDiverged, TrainSettings, train
from tests.conftest import TINY


class Regression(nn.Module):
    """Noisy linear regression from zero weights; the larger `scale` (the true weights' size), the
    larger the learning rate that reaches them in a few epochs."""

    def __init__(self, scale: float, items: int = 256, dim: int = 16):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(items, dim, generator=generator)
        self.y = self.x @ (scale * torch.randn(dim, generator=generator)) + 0.1 * torch.randn(items, generator=generator)
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, batch):
        jitter = 1 + 1e-3 * torch.rand(())   # a random draw, as dropout makes: the test must give it back
        return ((self.x[batch] @ self.w - self.y[batch]) ** 2).mean() * jitter

    def batches(self, batch_size, generator):
        return list(torch.randperm(len(self.x), generator=generator).split(batch_size))


SETTINGS = TrainSettings(epochs=5, batch_size=32, weight_decay=0.0, restarts=0)


def _start(objective: Regression, choice) -> float:
    """The loss the range test started from: its batch's, at the initial weights (put back after it)."""
    batch = objective.batches(choice.batch_size, torch.Generator().manual_seed(SETTINGS.seed))[0]
    with torch.no_grad():
        return float(objective(batch))


def _best_fixed_lr(scale: float) -> float:
    """The known good rate: the best final loss over a grid of fixed rates, three per decade."""
    losses = {}
    for k in range(-12, 0):
        objective = Regression(scale)
        try:
            train(objective, {"w": objective.w}, TrainSettings(**{**SETTINGS.__dict__, "lr": 10 ** (k / 3)}))
        except TrainingDiverged:
            continue
        with torch.no_grad():
            losses[10 ** (k / 3)] = float(objective(torch.arange(len(objective.x))))
    return min(losses, key=losses.get)


@pytest.mark.parametrize("scale", [0.03, 0.3])
def test_the_range_test_picks_within_a_factor_of_3_of_the_best_fixed_rate(scale):
    best = _best_fixed_lr(scale)
    objective = Regression(scale)
    before = objective.w.detach().clone()
    rng = torch.get_rng_state()
    choice = choose_lr(objective, {"w": objective.w}, SETTINGS, fallback=1e-3)
    assert best / 3 <= choice.lr <= best * 3, (choice.lr, best, choice.why)
    assert choice.why.startswith("range test: the loss reached its floor") and not choice.reused
    assert torch.equal(objective.w, before) and torch.equal(torch.get_rng_state(), rng)   # put back as it was
    # the curve is the rates tried, rising geometrically, and the loss after a step at each
    assert len(choice.lrs) == len(choice.losses) == choice.steps and choice.lrs == sorted(choice.lrs)
    assert 0 < choice.share <= 0.2
    if "turned up at" in choice.why:   # the test ended at the step the rule needed, not later
        assert turn(_start(objective, choice), choice.losses)[1] == choice.steps - 1


def test_the_rule_needs_a_fall_and_stops_at_the_turn():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert pick(1.0, lrs, [1.0, 0.999, 1.0, 1.2, 5.0])[0] is None   # never fell: the suggested rate is kept
    lr, why = pick(1.0, lrs, [0.97, 0.94, 1.0, 1.2, 5.0])   # fell 6%: less than the rule reads as learning
    assert lr is None and why.startswith("the loss did not fall 10% below 1 (")
    lr, why = pick(1.0, lrs, [0.9, 0.5, 0.8, 0.2, 5.0])   # turns up at 1e-2 (gives back 0.6 of 0.5 gained)
    assert lr == pytest.approx(10 ** -2.5)   # the middle of the floor's first rate and the turn
    assert "above its lowest, 0.5) at lr 0.001 and turned up at 0.01" in why
    assert pick(1.0, lrs, [0.9, 0.7, 0.5, 0.3, 0.1])[0] == 1.0   # still falling at the end
    lr, why = pick(1.0, lrs[:3], [0.9, 0.5, 0.4], not_finite_at=1e-1)   # fell, then not finite at 0.1: the turn
    assert lr == pytest.approx(10 ** -1.5) and "above its lowest, 0.4) at lr 0.01 and was not finite at 0.1" in why
    assert pick(1.0, lrs[:2], [1.0, 0.99], not_finite_at=1e-2)[0] is None   # never fell: nothing to judge


def test_a_flat_floor_is_read_from_where_the_loss_reached_it():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    # lowest at 0.1 (0.47), but within 10% of the 0.53 fallen (0.523) already at 1e-3: the floor starts there
    lr, why = pick(1.0, lrs, [0.9, 0.5, 0.48, 0.47, 5.0])
    assert lr == pytest.approx(10 ** -1.5), why   # the middle of 1e-3 and the turn at 1.0, not of 0.1 and 1.0
    assert "reached its floor (within 10% of its fall above its lowest, 0.47) at lr 0.001 and turned up at 1" in why
    lr, why = pick(1.0, lrs, [0.9, 0.6, 0.5, 0.47, 5.0])   # 0.5 is within 0.053 of 0.47; 0.6 is not
    assert lr == pytest.approx(10 ** -1), why
    assert pick(1.0, lrs[:4], [0.9, 0.5, 0.48, 0.47])[0] == 1e-3   # never turned up: the floor's first rate
    lr, why = pick(1.0, lrs[:3], [0.9, 0.5, 0.48], not_finite_at=1e-1)   # on the floor from 1e-3, then not finite
    assert lr == pytest.approx(1e-2) and "at lr 0.001 and was not finite at 0.1" in why, why


class Fragile(Regression):
    """Regression whose loss stops being finite once the weights are half way to the true ones (the
    loss has fallen by then, and is still falling)."""

    def __init__(self, scale: float):
        super().__init__(scale)
        self.limit = 0.5 * float(torch.linalg.lstsq(self.x, self.y[:, None]).solution.norm())

    def forward(self, batch):
        loss = super().forward(batch)
        return loss if self.w.detach().norm() < self.limit else loss * float("nan")


def test_a_loss_that_goes_non_finite_after_falling_has_turned_up_there():
    objective = Fragile(0.3)
    choice = choose_lr(objective, {"w": objective.w}, SETTINGS, fallback=1e-3)
    lowest, start = min(choice.losses), _start(objective, choice)
    floor = next(lr for lr, loss in zip(choice.lrs, choice.losses) if loss <= lowest + 0.1 * (start - lowest))
    edge = choice.lrs[-1] * (choice.lrs[-1] / choice.lrs[-2])   # the rate of the step that went non-finite
    assert "was not finite at" in choice.why, choice.why
    assert choice.lr == pytest.approx((floor * edge) ** 0.5, rel=1e-6)


def test_a_few_shot_run_gets_the_least_test_and_a_long_one_stays_within_its_share():
    rates, batch = plan(items_per_epoch=300, epochs=15, batch_size=32, suggested=1e-2)
    assert (rates, batch) == (rising_rates(20), 16) and len(rates) * batch <= 0.15 * 300 * 15
    # the floor, 14 steps of 8, is over a 16-shot run's share (72 of 480 items): it drops its rates
    # below 1% of the suggested one, in their places on the 14-step grid, and keeps every one above
    rates, batch = plan(items_per_epoch=32, epochs=15, batch_size=32, suggested=1e-2)
    grid = rising_rates(14)
    assert batch == 8 and rates == grid[4:] and grid[3] < 1e-4 <= grid[4] and rates[-1] == 0.3
    assert plan(items_per_epoch=32, epochs=15, batch_size=32, suggested=1e-4) == (grid, 8)   # none below full's 1e-6
    # never more dropped than the share asks: 96 of a 14 × 8 test fit, so two steps go
    assert plan(items_per_epoch=32, epochs=20, batch_size=32, suggested=1e-2) == (grid[2:], 8)
    # never a batch larger than the data
    assert plan(items_per_epoch=3, epochs=1, batch_size=32, suggested=1e-2) == (grid[4:], 3)


def test_a_run_with_auto_says_what_it_chose_and_a_cached_test_is_reused_for_the_same_run(shapes, tmp_path):
    cache = ChoiceCache(tmp_path / "lr-range")
    first = tune(TINY, shapes, "lora", shots=8, epochs=2, batch_size=4, out=tmp_path / "first", lr_cache=cache)
    choice = first.train.lr_choice
    assert choice.steps > 3 and not choice.reused and first.train.lr == choice.lr
    assert len(cache) == 1
    saved = json.loads((tmp_path / "first" / "run.json").read_text())["train"]["lr_choice"]
    assert saved["lr"] == choice.lr and saved["why"] == choice.why and len(saved["lrs"]) == choice.steps
    again = tune(TINY, shapes, "lora", shots=8, epochs=2, batch_size=4, out=tmp_path / "again", lr_cache=cache)
    assert again.train.lr_choice.reused and again.train.lr == first.train.lr
    assert again.train.step_losses == first.train.step_losses   # the test left nothing behind: same training
    # one more epoch of a run already over its share plans the same test: it is reused, its share of
    # the longer training said; a smaller batch plans another
    longer = tune(TINY, shapes, "lora", shots=8, epochs=3, batch_size=4, out=tmp_path / "longer", lr_cache=cache)
    assert longer.train.lr_choice.reused and longer.train.lr_choice.lr == choice.lr and len(cache) == 1
    assert longer.train.lr_choice.share == pytest.approx(choice.share * 2 / 3)
    smaller = tune(TINY, shapes, "lora", shots=8, epochs=2, batch_size=2, out=tmp_path / "smaller", lr_cache=cache)
    assert not smaller.train.lr_choice.reused and smaller.train.lr_choice.batch_size == 2 and len(cache) == 2
    other_seed = tune(TINY, shapes, "lora", shots=8, epochs=2, batch_size=4, seed=1, out=tmp_path / "seed1",
                      lr_cache=cache)
    assert not other_seed.train.lr_choice.reused and len(cache) == 3   # other shots drawn: tested again
    given = tune(TINY, shapes, "lora", shots=8, epochs=2, batch_size=4, lr=3e-3, out=tmp_path / "given")
    assert given.train.lr == 3e-3 and given.train.lr_choice is None


def test_a_cached_choice_that_does_not_read_back_counts_as_absent(tmp_path):
    cache = ChoiceCache(tmp_path)
    key = ("offline", "the bundled offline model", "lora", "{}", "abc", "retrieval", 8, [], 16, 0, 10, 32, "auto")
    cache[key] = LrChoice(lr=0.01, why="range test", lrs=[1e-3, 1e-2], losses=[1.0, 0.5], steps=2, batch_size=8)
    assert cache[key].lr == 0.01 and key in cache
    (stored,) = tmp_path.glob("*.json")
    record = json.loads(stored.read_text())
    for broken in ({**record["value"], "lr": "fast"}, {**record["value"], "lr": -1.0},
                   {**record["value"], "losses": [1.0]}, {**record["value"], "lr": float("nan")},
                   {**record["value"], "lr": 1e-300}, {**record["value"], "lr": 1e9},   # no run trains at these
                   {**record["value"], "steps": 10**15}, {**record["value"], "seconds": -100.0},
                   {**record["value"], "share": -1.0}, {**record["value"], "finished": False}):
        stored.write_text(json.dumps({"key": record["key"], "value": broken}))
        assert key not in cache


def test_the_cli_finds_the_rate_by_default_and_uses_a_given_one_as_given(shapes, tmp_path, capsys):
    arguments = ["tune", "--model", TINY, "--data", str(shapes), "--method", "bitfit", "--shots", "4",
                 "--epochs", "1", "--batch-size", "4", "--cache", str(tmp_path / "cache"), "--json"]
    assert main([*arguments, "--out", str(tmp_path / "auto")]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert found["lr_choice"]["lr"] == found["lr"] and found["lr_choice"]["why"]
    assert "lrs" not in found["lr_choice"] and len(list((tmp_path / "cache" / "lr-range").glob("*.json"))) == 1
    without_json = [a for a in arguments if a != "--json"]
    assert main([*without_json, "--out", str(tmp_path / "again")]) == 0   # a person reading the output is told too
    said = capsys.readouterr().out.splitlines()[3]
    assert said == (f"learning rate {found['lr']:.2g}; {found['lr_choice']['why']} (reused: measured by an earlier "
                    f"run on this data)")
    assert main([*without_json, "--out", str(tmp_path / "typed"), "--lr", "0.02"]) == 0
    assert capsys.readouterr().out.splitlines()[3] == "learning rate 0.02, as given"
    assert main([*without_json, "--out", str(tmp_path / "none"), "--epochs", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[3].endswith(": nothing was trained, so no range test ran")
    assert main([*arguments, "--out", str(tmp_path / "given"), "--lr", "0.02"]) == 0
    given = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert given["lr"] == 0.02 and given["lr_choice"] is None
    said = {}
    for bad in ("fast", "AUTO", "-1e-3"):   # refused by the parser, still one {"error"} line under --json
        assert main([*arguments, "--out", str(tmp_path / "bad"), "--lr", bad]) == 2
        out, err = capsys.readouterr()
        said[bad] = json.loads(out.strip().splitlines()[-1])["error"]
        assert said[bad].startswith("python -m core tune: error: argument --lr") and said[bad] in err
    assert said["fast"].endswith("a number or auto, not 'fast'") and said["AUTO"].endswith("not 'AUTO'")
    assert said["-1e-3"].endswith("expected one argument")   # argparse reads it as an option: write --lr=-1e-3
    assert main(["info", "--method", "nosuch", "--json=1"]) == 2   # --json said otherwise: still its contract
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"].startswith("python -m core info")
    assert main(["info", "--js"]) == 2 and capsys.readouterr().out == ""   # no flag is abbreviated, --json neither
    assert main(["tune", "--help", "--json"]) == 0   # help too is one JSON line under --json
    assert "--lr LR" in json.loads(capsys.readouterr().out.strip())["help"]
    assert main(["tune", "--help"]) == 0 and capsys.readouterr().out.startswith("usage: python -m core tune")
    assert not (tmp_path / "bad").exists()


def test_the_training_figure_shows_the_range_test_beside_the_loss(shapes, tmp_path):
    from core import figures

    result = tune(TINY, shapes, "bitfit", shots=4, epochs=1, batch_size=4, out=tmp_path / "run")
    figure = figures.training_figure(result)
    curve = next(trace for trace in figure.data if trace.name == "range test loss")
    assert list(curve.x) == result.train.lr_choice.lrs and list(curve.y) == result.train.lr_choice.losses
    assert figure.layout.xaxis2.type == "log" and curve.xaxis == "x2"
    lr = result.train.lr_choice.lr
    (line,) = [s for s in figure.layout.shapes if s.xref == "x2"]
    assert line.x0 == line.x1 == lr   # on a log axis plotly places a shape at the value itself
    (label,) = [a for a in figure.layout.annotations if a.text == f"chosen {lr:.2g}"]
    assert label.xref == "x2" and label.x == pytest.approx(math.log10(lr))   # and an annotation at its log10


def test_a_cancel_ends_the_test_with_the_suggested_rate_and_nothing_is_cached(tmp_path):
    cache, key = ChoiceCache(tmp_path), ("offline", "w", "lora", 1, "{}", "abc", "retrieval", 8, [], 16, 0, 5, 32, "fp32")
    objective = Regression(0.3)
    calls = []
    choice = choose_lr(objective, {"w": objective.w}, SETTINGS, fallback=2e-3, cache=cache, key=key,
                       stop=lambda: calls.append(1) or len(calls) > 3)
    assert choice.lr == 2e-3 and not choice.finished and choice.steps == 3
    assert choice.why == "stopped before the range test finished; kept the suggested 0.002" and len(cache) == 0
    assert torch.equal(objective.w, torch.zeros(16))


@pytest.mark.parametrize("chance_share", [0.5, 2.0])
def test_a_model_worse_than_chance_is_judged_against_chance(chance_share, monkeypatch):
    """An overconfident start (VQA's, 10 nats where chance is 3) gains loss by flattening its logits
    at any high rate: the rule then needs the loss to fall below chance's, not below the start."""
    import core.lr_range as lr_range

    objective = Regression(0.3)
    batch = objective.batches(16, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        start = float(objective(batch))
    objective.chance_loss = chance_share * start
    references = []
    monkeypatch.setattr(lr_range, "pick", lambda reference, *curve: references.append(reference) or (None, "x"))
    lr_range.range_test(objective, {"w": objective.w}, lr_range.rising_rates(12), batch_size=16, weight_decay=0.0,
                        grad_clip=1.0, autocast_to=None)
    assert references == [pytest.approx(min(start, chance_share * start), rel=1e-2)]
    monkeypatch.undo()
    assert lr_range.pick(3.0, [1, 2, 3, 4], [9.0, 6.0, 3.2, 3.1], worse_than_chance=True)[0] is None   # flattened
    # worse than chance: the first rate whose loss fell 10% below chance, not the middle of the lowest and the turn
    lr, why = lr_range.pick(3.0, [1, 2, 3, 4], [9.0, 2.5, 2.0, 9.0], worse_than_chance=True)
    assert lr == 2 and why.startswith("range test: the model started worse than chance; the loss first fell 10% "
                                      "below chance's 3 at lr 2")
    assert lr_range.pick(3.0, [1, 2, 3, 4], [9.0, 2.5, 2.0, 9.0])[0] == pytest.approx(12 ** 0.5)   # from a start of 3


def test_a_model_worse_than_chance_stops_the_test_where_its_loss_first_falls_below_chance():
    import core.lr_range as lr_range

    objective = Regression(0.3)
    batch = objective.batches(16, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        start = float(objective(batch))
    objective.chance_loss = 0.5 * start   # the start is twice chance's loss
    choice = lr_range.range_test(objective, {"w": objective.w}, lr_range.rising_rates(20), batch_size=16,
                                 weight_decay=0.0, grad_clip=1.0, autocast_to=None)
    assert choice.losses[-1] <= 0.9 * 0.5 * start < min(choice.losses[:-1])   # it stopped at the first such step
    assert choice.lr == choice.lrs[-1] and choice.steps < 20 and "worse than chance" in choice.why


class NeverFalling(Regression):
    """Regression whose chance's loss is `chance_share` times its start and whose loss never falls 10%
    below the lower of the two (held at 0.95 of it): with a share below 1 a model that starts worse
    than chance and only comes down towards it."""

    def __init__(self, chance_share: float):
        super().__init__(0.3)
        with torch.no_grad():
            start = float(super().forward(self.batches(16, torch.Generator().manual_seed(0))[0]))
        self.chance_loss, self.least = chance_share * start, 0.95 * min(1.0, chance_share) * start

    def forward(self, batch):
        return super().forward(batch).clamp(min=self.least)


def test_a_model_worse_than_chance_that_never_fell_below_it_trains_one_restart_above_the_suggested_rate():
    import core.lr_range as lr_range
    from core.trainer import RESTART_FACTOR

    objective = NeverFalling(chance_share=0.5)
    choice = lr_range.range_test(objective, {"w": objective.w}, lr_range.rising_rates(20), batch_size=16,
                                 weight_decay=0.0, grad_clip=1.0, autocast_to=None, fallback=1e-3)
    assert choice.lr == pytest.approx(RESTART_FACTOR * 1e-3) and choice.lrs[-1] == pytest.approx(0.3)
    assert choice.why.startswith("the loss did not fall 10% below ") and choice.why.endswith(
        "chose 3× the suggested 0.001, 0.003 (a run that collapses there restarts at 0.001)")
    lrs = [1e-3, 1e-2, 3e-2, 0.1]
    assert lr_range.above_suggested(1e-2, 9.0, lrs, [8.0, 6.0, 4.0, 3.1])[0] == pytest.approx(3e-2)
    # one batch's loss is noisy there: above its start at that rate is no reason to refuse it (a step
    # of Aurora's test on the whole split of novel colours) ...
    assert lr_range.above_suggested(1e-2, 9.77, lrs, [9.5, 4.7, 9.97, 3.0])[0] == pytest.approx(3e-2)
    # ... but a blow-up there is, and so is a test that never got there: the suggested rate
    assert lr_range.above_suggested(1e-2, 9.0, lrs, [8.0, 8.5, 40.0]) == (
        None, "; the model started worse than chance, and its loss blew up at 0.03, the first rate tried at or above 0.03")
    assert lr_range.above_suggested(1e-2, 9.0, lrs[:2], [8.0, 8.5]) == (
        None, "; the model started worse than chance, and the test stopped below 0.03")
    # a model better than chance whose loss never fell keeps the suggested rate (a batch it already separates)
    objective = NeverFalling(chance_share=2.0)
    choice = lr_range.range_test(objective, {"w": objective.w}, lr_range.rising_rates(20), batch_size=16,
                                 weight_decay=0.0, grad_clip=1.0, autocast_to=None, fallback=1e-3)
    assert choice.lr == 1e-3 and choice.why.endswith("; kept the suggested 0.001") and "chance" not in choice.why
