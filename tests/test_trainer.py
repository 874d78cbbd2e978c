import math
import threading

import pytest
import torch
from torch import nn

from safetensors.torch import load_file

from core.runs import RunError, tune
from core.trainer import TrainingDiverged, TrainSettings, _schedule, guard_window, restart_note, train
from tests.conftest import TINY


class Quadratic(nn.Module):
    """loss = |w - 3|², batches of nothing; returns NaN from `nan_at` on."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, batch):
        self.calls += 1
        if self.nan_at is not None and self.calls >= self.nan_at:
            return self.w.sum() * float("nan")
        return ((self.w - 3) ** 2).sum()

    def batches(self, batch_size, generator):
        return [torch.randperm(8, generator=generator)[:batch_size] for _ in range(4)]


def test_trainer_minimises_and_reports_progress():
    objective, seen = Quadratic(), []
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=10, lr=0.5, grad_clip=0), progress=seen.append)
    assert len(log.step_losses) == 40 and len(log.epoch_losses) == 10
    assert log.step_losses[-1] < 0.01 * log.step_losses[0]
    assert [p.step for p in seen] == list(range(1, 41)) and seen[-1].total_steps == 40 and seen[-1].eta == 0


def test_a_loss_that_stays_nan_ends_after_two_restarts_with_a_clear_message():
    objective = Quadratic(nan_at=10)   # calls 1-4 measure the untrained weights: NaN from step 6 on
    # epoch 1 (steps 1-4) had learned, so the first restart goes back to its end; diverging again
    # within the epoch after it, those weights are given up and the second goes back to the start
    expected = (r"the loss became nan at step 1 with lr 0.0556 \(before that: lr 0.5 diverged at step 6 \(the loss "
                r"became nan\); restarted at 0.167 from epoch 1's weights; lr 0.167 diverged at step 5 \(the loss "
                r"became nan\); restarted at 0.0556 from the untrained weights\); try a lower learning rate")
    with pytest.raises(TrainingDiverged, match=expected):
        train(objective, {"w": objective.w}, TrainSettings(epochs=3, lr=0.5))


class Overshoot(Quadratic):
    """|w - 3|², with a wall beyond |w| = 5 that steps too large run into."""

    def forward(self, batch):
        return ((self.w - 3) ** 2).sum() + 1000 * torch.relu(self.w.abs() - 5).sum()


def test_a_blow_up_restarts_from_the_untrained_weights_at_a_third_of_the_lr():
    objective, seen = Overshoot(), []
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=10, lr=10.0, grad_clip=0), progress=seen.append)
    assert [r["lr"] for r in log.restarts] == [10.0, pytest.approx(10 / 3)] and log.lr == pytest.approx(10 / 9)
    assert all(r["reason"].startswith("the loss's median over 10 steps rose to ") for r in log.restarts)
    assert log.steps == log.total_steps == 40 and log.step_losses[-1] < 0.01 * 36   # the last attempt learned
    # each attempt (where the step numbers start again) begins from the untrained weights: |0 - 3|² × 4
    assert [p.loss for p in seen if p.step == 1] == [36.0, 36.0, 36.0]


class Spiky(Quadratic):
    """Near 0 but for one batch an epoch that costs 4.5 at any rate (two pictures a batch of 2 confuses)."""

    def forward(self, batch):
        loss = super().forward(batch) * 1e-3
        return loss + 4.5 if self.calls > 4 and self.calls % 4 == 2 else loss


@pytest.mark.parametrize("epochs", [12, 4], ids=["window-of-10", "short-run-window-of-5"])
def test_one_hard_small_batch_an_epoch_is_no_divergence(epochs):
    # the untrained epoch (calls 1-4) happens to miss the hard batch: its mean loss is 0.036; a
    # window of 5 steps holds two hard batches at most, never its median
    objective = Spiky()
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=epochs, lr=0.3, grad_clip=0))
    assert log.restarts == [] and log.steps == 4 * epochs and max(log.step_losses) > 4.5


class PerfectThenWorse(Quadratic):
    """Loss 0 for the untrained weights (calls 1-4), 2 from then on."""

    def forward(self, batch):
        return super().forward(batch) * 0 + (0.0 if self.calls <= 4 else 2.0)


def test_a_rise_from_an_untrained_loss_of_zero_is_told_in_nats():
    objective = PerfectThenWorse()
    with pytest.raises(TrainingDiverged, match=r"^the loss's median over 10 steps rose to 2, 2 nats above the "
                                               r"untrained weights' 0 at step 10 with lr 0.111 "):
        train(objective, {"w": objective.w}, TrainSettings(epochs=8, lr=1.0))


class OvershootUnscoredAtFirst(Overshoot):
    """Overshoot, but the untrained weights cannot score one batch (NaN at call 2)."""

    def forward(self, batch):
        loss = super().forward(batch)
        return loss * float("nan") if self.calls == 2 else loss


def test_a_batch_the_untrained_weights_cannot_score_does_not_switch_the_guard_off():
    objective = OvershootUnscoredAtFirst()
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=10, lr=10.0, grad_clip=0))
    assert [r["lr"] for r in log.restarts] == [10.0, pytest.approx(10 / 3)]
    assert all("× the untrained weights' loss" in r["reason"] for r in log.restarts)   # measured against 36


class Collapsing(Quadratic):
    """|w - 3|², except over a window of calls where the embeddings collapse: the logit spread
    falls from 1 to 0.01 and the loss sits at 1.2× the untrained weights' — too little a rise for
    the loss alone to be caught, as with a model that starts near chance (`hidden`: the loss does not
    change at all). At `unmeasured` calls the batch has no spread (NaN: one candidate)."""

    def __init__(self, collapsed_calls, hidden=False, unmeasured=()):
        super().__init__()
        self.collapsed_calls, self.hidden, self.unmeasured = collapsed_calls, hidden, unmeasured

    def forward(self, batch):
        loss = super().forward(batch)
        collapsed = self.calls in self.collapsed_calls
        self.last_spread = torch.tensor(math.nan if self.calls in self.unmeasured else 0.01 if collapsed else 1.0)
        return loss * 0 + 1.2 * 36 if collapsed and not self.hidden else loss


@pytest.mark.parametrize("unmeasured", [(), (2, 10, 30)], ids=["every-batch-measured", "some-batches-without-spread"])
def test_a_collapse_restarts_from_the_best_epoch_so_far_and_says_so(unmeasured):
    # 4 calls measure the untrained weights (loss 36); steps 18 on (calls 22 on) collapse, for 8 calls
    objective, scored, seen = Collapsing(collapsed_calls=range(22, 30), unmeasured=unmeasured), [], []
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0),
                progress=seen.append, epoch_end=scored.append)
    (restart,) = log.restarts
    assert restart["lr"] == 0.3 and restart["restarted_at"] == pytest.approx(0.1) and log.lr == pytest.approx(0.1)
    assert restart["reason"].startswith("the embeddings collapsed (the median spread of a batch's logits fell to 0.")
    # back to the last epoch before the collapse (step 17, the first after it, still showed its weights fine)
    # the sixth collapsed step of ten makes the median collapsed
    assert restart["step"] == 23 and restart["from_epoch"] == 4
    diverged_in = (restart["step"] - 1) // 4 + 1
    assert scored == [*range(1, diverged_in), *range(5, 13)]   # epochs 5 on are trained and scored again
    assert [p.step for p in seen].count(17) == 2 and log.steps == len(log.step_losses) == 48
    assert log.steps_run == 48 + restart["step"] - 16
    again = [p for p in seen if p.step == 17][-1]   # the restarted attempt's first report: its own pace
    assert again.first_step == 16 and again.eta == pytest.approx(again.elapsed * 31)
    assert len(log.epoch_losses) == 12 and log.epoch_losses[-1] < 0.01 * 36
    assert "restarted at 0.1 from epoch 4's weights" in restart_note(log.restarts)


def test_weights_whose_next_batch_has_collapsed_are_never_the_best():
    # the spread collapses from step 17 on (call 21), the first batch after epoch 4, while the loss
    # goes on falling for 8 calls: epoch 4's weights, and epoch 5's, fail their check
    objective = Collapsing(collapsed_calls=range(21, 29), hidden=True)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    assert [r["from_epoch"] for r in log.restarts] == [3] and "collapsed" in log.restarts[0]["reason"]


def test_a_short_run_is_judged_over_a_third_of_its_steps():
    # 4 epochs of 4 steps: the embeddings collapse over its last 5 steps (calls 16-20); a 10-step
    # window never had them in its median (5 of 10), a third of the run (5 steps) does
    objective = Collapsing(collapsed_calls=range(16, 21))
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=4, lr=0.3, grad_clip=0))
    (restart,) = log.restarts
    assert restart["step"] == 14 and "collapsed" in restart["reason"] and log.lr == pytest.approx(0.1)
    assert log.steps == 16 and log.epoch_losses[-1] < 36


class MediaCollapsing(Quadratic):
    """|w - 3|², falling as it should, its logits apart (spread 2) while over `collapsed_calls` a
    batch's distinct media come together: their spread falls from 0.8 to `collapsed_to` (a partial
    collapse: VQA with Aurora at 1e-2 on the offline world's whole split kept its logits apart and its
    pictures at 0.01-0.03, from 0.87 untrained)."""

    def __init__(self, collapsed_calls, collapsed_to):
        super().__init__()
        self.collapsed_calls, self.collapsed_to = collapsed_calls, collapsed_to

    def forward(self, batch):
        loss = super().forward(batch)
        self.last_spread = torch.tensor(2.0)
        self.last_media_spread = torch.tensor(self.collapsed_to if self.calls in self.collapsed_calls else 0.8)
        return loss


def test_media_that_come_together_while_the_logits_stay_apart_restart_the_run():
    # calls 1-4 measure the untrained weights (media spread 0.8); steps 18 on (calls 22 on) collapse
    objective = MediaCollapsing(collapsed_calls=range(22, 30), collapsed_to=0.008)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    (restart,) = log.restarts
    assert restart["reason"] == ("the media embeddings collapsed (the median spread of a batch's media fell to "
                                 "0.008, 0.01× the untrained weights')")
    assert restart["step"] == 23 and restart["from_epoch"] == 4 and log.lr == pytest.approx(0.1)
    assert log.steps == 48 and log.epoch_losses[-1] < 0.01 * 36


def test_weights_whose_next_batch_has_its_media_collapsed_are_never_the_best():
    # the media collapse from step 17 on (call 21), the first batch after epoch 4: its weights fail their check
    objective = MediaCollapsing(collapsed_calls=range(21, 29), collapsed_to=0.008)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    assert [r["from_epoch"] for r in log.restarts] == [3] and "media embeddings collapsed" in log.restarts[0]["reason"]


def test_media_that_come_closer_as_a_run_learns_are_no_collapse():
    # runs seen to learn came to 0.047× their untrained media spread on the whole split, 0.033× at 16 shots
    objective = MediaCollapsing(collapsed_calls=range(10, 40), collapsed_to=0.8 * 0.03)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    assert log.restarts == [] and log.steps == 48


def test_the_guards_window_is_a_third_of_a_short_run_between_5_and_10_steps():
    assert [guard_window(steps) for steps in (1, 10, 15, 18, 27, 30, 45, 400)] == [5, 5, 5, 6, 9, 10, 10, 10]


class Spread(Quadratic):
    """|w - 3|², its batches' logit spread `spread(call)`."""

    def __init__(self, spread):
        super().__init__()
        self.spread = spread

    def forward(self, batch):
        loss = super().forward(batch)
        self.last_spread = torch.tensor(self.spread(self.calls))
        return loss


@pytest.mark.parametrize("spread", [lambda call: 0.05, lambda call: 20.0 if call <= 6 else 2.0],
                         ids=["near-constant-from-the-start", "overconfident-start-flattened-tenfold"])
def test_a_spread_that_is_small_but_never_fell_or_fell_but_not_near_constant_is_no_collapse(spread):
    # a random-init model's logits can start near constant; learning VQA flattens an overconfident
    # model's tenfold, to ~2 logits: neither is the embeddings collapsing
    objective = Spread(spread)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    assert log.restarts == [] and log.steps == 48 and log.epoch_losses[-1] < 0.05 * 36


class OntoChance(Quadratic):
    """|w - 3|² as a model that starts worse than chance (chance's loss 3, the untrained weights'
    36, their logit spread 5): over `flat_calls` its candidates score almost alike (spread
    `flat_spread`) with the loss at `flat_loss`; elsewhere the spread is 2."""

    def __init__(self, flat_calls, flat_spread=0.2, flat_loss=3.05, floor=0.0):
        super().__init__()
        self.flat_calls, self.flat_spread, self.flat_loss, self.floor = flat_calls, flat_spread, flat_loss, floor
        self.chance_loss = 3.0

    def forward(self, batch):
        loss = super().forward(batch)
        flat = self.calls in self.flat_calls
        self.last_spread = torch.tensor(5.0 if self.calls <= 4 else self.flat_spread if flat else 2.0)
        return loss * 0 + self.flat_loss if flat else loss.clamp(min=self.floor)


def test_answers_scored_alike_at_chance_loss_are_a_collapse():
    # VQA at a rate past its cliff: the loss falls from far above chance onto it and stays, every
    # answer scored almost alike (spread 0.2, above the near-constant 0.1): steps 18 on (calls 22 on)
    objective = OntoChance(flat_calls=range(22, 30))
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    (restart,) = log.restarts
    assert restart["step"] == 23 and restart["from_epoch"] == 4 and restart["restarted_at"] == pytest.approx(0.1)
    assert restart["reason"] == ("the embeddings collapsed (the median spread of a batch's logits fell to 0.2, "
                                 "0.04× the untrained weights', the loss's median 3.05 at chance's 3: every "
                                 "candidate scored alike)")


def test_weights_that_only_fell_onto_chance_are_not_gone_back_to():
    # the loss falls from 36 onto chance's (3) and no further before the answers flatten: those
    # epochs learned nothing a restart should keep, so it starts from the untrained weights
    objective = OntoChance(flat_calls=range(22, 30), floor=3.0)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    assert [(r["step"], r["from_epoch"]) for r in log.restarts] == [(23, 0)]
    assert "restarted at 0.1 from the untrained weights" in restart_note(log.restarts)


@pytest.mark.parametrize("flat_spread, flat_loss", [(1.0, 3.05), (0.2, 2.5)],
                         ids=["at-chance-but-spread", "flat-but-below-chance"])
def test_a_loss_passing_chance_or_a_flat_spread_below_it_is_no_collapse(flat_spread, flat_loss):
    # learning VQA passes chance's loss with its answers ~2 logits apart, and a model whose loss is
    # well below chance's has learned, however flat its logits
    objective = OntoChance(flat_calls=range(22, 30), flat_spread=flat_spread, flat_loss=flat_loss)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=12, lr=0.3, grad_clip=0))
    assert log.restarts == []

class Unsound(Quadratic):
    """|w - 3|², but past w = 4 (where a high rate overshoots to) every batch that starts with an
    even item overflows: weights there can pass one batch and fail the next, at any rate."""

    def forward(self, batch):
        loss = super().forward(batch)
        return loss * float("nan") if self.w.detach().mean() > 4 and int(batch[0]) % 2 == 0 else loss


def test_best_weights_that_diverge_again_at_once_are_given_up_for_the_untrained_ones():
    objective, seen = Unsound(), []
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=6, lr=2.0, grad_clip=0), progress=seen.append)
    # epoch 1 ended past 4 and passed its check batch; from there even a third of the rate fails
    # within the epoch, so the second restart starts untrained, at a ninth, and learns
    assert [(r["lr"], r["from_epoch"]) for r in log.restarts] == [(2.0, 1), (pytest.approx(2 / 3), 0)]
    assert "restarted at 0.222 from the untrained weights" in restart_note(log.restarts)
    assert log.steps == log.total_steps == 24 and [p.loss for p in seen if p.step == 1][-1] == 36.0
    assert log.step_losses[-1] < 0.05 * 36 and math.isfinite(log.step_losses[-1])


class TwoNans(Quadratic):
    """|w - 3|², NaN at the calls in `at` only."""

    def __init__(self, *at):
        super().__init__()
        self.at = at

    def forward(self, batch):
        loss = super().forward(batch)
        return loss * float("nan") if self.calls in self.at else loss


def test_a_restart_that_finished_an_epoch_before_diverging_keeps_its_best_weights():
    # calls 1-4 measure the untrained weights; NaN at step 10 (epoch 3), back to epoch 2; the restart
    # finishes epoch 3 (steps 9-12), its check passes, then NaN at step 15: back to epoch 3, not the start
    objective = TwoNans(4 + 9 + 1, 4 + 9 + 1 + 7)
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=6, lr=0.3, grad_clip=0))
    assert [(r["step"], r["from_epoch"]) for r in log.restarts] == [(10, 2), (15, 3)]
    assert log.steps == 24 and len(log.epoch_losses) == 6


class OneNan(Quadratic):
    """|w - 3|², NaN at call `at` only."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def forward(self, batch):
        loss = super().forward(batch)
        return loss * float("nan") if self.calls == self.at else loss


def test_the_guard_goes_back_to_the_epoch_with_the_lowest_mean_loss():
    objective, seen = OneNan(at=4 + 4 * 5 + 2), []   # one NaN in epoch 6, at step 22
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=6, lr=0.3, grad_clip=0), progress=seen.append)
    (restart,) = log.restarts
    assert restart["step"] == 22 and restart["reason"] == "the loss became nan"
    first_attempt = [p.loss for p in seen[:20]]   # steps 1-20: five epochs of four
    means = [sum(first_attempt[i:i + 4]) / 4 for i in range(0, 20, 4)]
    assert restart["from_epoch"] == 1 + means.index(min(means))
    assert log.epoch_losses[:restart["from_epoch"]] == pytest.approx(means[:restart["from_epoch"]])
    assert len(log.epoch_losses) == 6 and log.steps == 24


def test_cancel_flag_stops_between_steps():
    objective, flag = Quadratic(), threading.Event()
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=5),
                progress=lambda p: flag.set() if p.step == 3 else None, cancel=flag.is_set)
    assert log.cancelled and len(log.step_losses) == 3


def test_the_loop_reaches_the_host_once_per_logging_interval(shapes, monkeypatch):
    """Losses stay on the device between reports: every .item(), .cpu(), .tolist() and tensor
    truth test in the loop (objective, optimiser, clipping and bookkeeping alike) is counted."""
    from core.backbones import load_backbone
    from core.pet import attach
    from core.tasks import retrieval

    from core.data import read_dataset

    backbone = load_backbone(TINY, seed=0)
    handle = attach(backbone, "aurora", {})
    dataset = read_dataset(shapes, shapes.parent)
    objective = retrieval.RetrievalObjective(backbone, retrieval.prepare(backbone, dataset, dataset.split("train")[:16]))
    counts = {"syncs": 0}
    for name in ("item", "cpu", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            counts["syncs"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    reports = []
    log = train(objective, handle.trainable_parameters(),
                TrainSettings(epochs=2, lr=1e-3, batch_size=4, log_every=5), progress=reports.append)
    monkeypatch.undo()
    assert log.steps == 16 and len(log.step_losses) == 16 and len(log.epoch_losses) == 2
    # every 5 steps and at each epoch's end (the guard keeps the best epoch's weights)
    assert [(p.step, p.epoch) for p in reports] == [(5, 1), (8, 1), (13, 2), (16, 2)]
    assert counts["syncs"] <= len(reports), counts


def test_a_deadline_stops_training_cleanly_and_says_so(monkeypatch):
    objective, clock = Quadratic(), [0.0]

    def tick(p) -> None:   # the clock reaches the deadline during step 7
        clock[0] = 100.0 if p.step == 7 else clock[0]

    monkeypatch.setattr("core.trainer.time.monotonic", lambda: clock[0])
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=5), progress=tick, deadline=100.0)
    monkeypatch.undo()
    assert log.out_of_time and not log.cancelled and (log.steps, log.total_steps) == (7, 20)
    assert len(log.step_losses) == 7


def test_a_divergence_found_as_the_deadline_stops_the_run_goes_back_to_its_best_weights_and_ends(monkeypatch):
    """On a GPU the losses reach the host every 10 steps: the deadline's last report can find that the
    run had gone wrong. It goes back to its best weights and ends at the rate it trained at; no
    restart is reported that took no step."""
    objective = Quadratic(nan_at=10)   # calls 1-4 measure the untrained weights: NaN from step 6 on
    monkeypatch.setattr("core.trainer.time.monotonic", lambda: 100.0 if objective.calls >= 11 else 0.0)   # after step 7
    log = train(objective, {"w": objective.w}, TrainSettings(epochs=5, lr=0.5, log_every=10), deadline=100.0)
    monkeypatch.undo()
    assert log.out_of_time and log.lr == 0.5 and len(log.epoch_losses) == 1 and len(log.step_losses) == 4
    (restart,) = log.restarts
    assert (restart["step"], restart["restarted_at"], restart["from_epoch"]) == (6, None, 1)
    assert torch.isfinite(objective.w).all() and ((objective.w - 3) ** 2).sum() < 36   # epoch 1's weights
    assert restart_note(log.restarts) == ("lr 0.5 diverged at step 6 (the loss became nan); the run had been "
                                          "stopped there, and ends at epoch 1's weights")


def test_warmup_then_cosine_by_step():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = _schedule(optimizer, total_steps=10, warmup=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[-1] < 0.05


def test_same_seed_same_numbers(shapes, tmp_path):
    runs = [tune(TINY, shapes, "lora", {"dropout": 0.25}, shots=8, epochs=2, lr=1e-2, seed=4, out=tmp_path / f"r{i}")
            for i in range(2)]
    assert runs[0].train.step_losses == runs[1].train.step_losses
    assert runs[0].tuned == runs[1].tuned
    other = tune(TINY, shapes, "lora", shots=8, epochs=2, lr=1e-2, seed=5, out=tmp_path / "r2")
    assert other.train.step_losses != runs[0].train.step_losses
    assert runs[0].dataset.train_used == 8


def test_precision_auto_is_bf16_exactly_where_the_hardware_computes_it_natively(monkeypatch):
    from core import trainer

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert trainer.autocast_for("auto", cpu) == ("bf16" if trainer.bf16_supported(cpu) else None)
    assert trainer.autocast_for("bf16", cpu) == "bf16" and trainer.autocast_for("fp32", cpu) is None
    assert trainer.autocast_for("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        trainer.autocast_for("half", cpu)
    # A GPU: bf16 only where it is native (emulation does not count), fp16 with a scaler elsewhere.
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)
    assert trainer.autocast_for("auto", gpu) == "fp16" and asked == [False]


def test_fp16_autocast_trains_with_a_gradient_scaler(shapes, tmp_path, monkeypatch):
    scalers = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scalers.append(kwargs.get("enabled"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    result = tune(TINY, shapes, "lora", shots=8, epochs=3, lr=1e-2, precision="fp16", out=tmp_path / "fp16")
    losses = result.train.epoch_losses
    assert result.train.autocast == "fp16" and not result.train.bf16 and scalers == [True]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert {t.dtype for t in load_file(tmp_path / "fp16" / "pet.safetensors").values()} == {torch.float32}


def test_bf16_autocast_trains_and_keeps_parameters_in_fp32(shapes, tmp_path):
    """Asked for explicitly, bf16 runs everywhere (emulated where the CPU lacks avx512_bf16/AMX);
    the PET parameters stay fp32, and run.json says what was asked and what ran."""
    from core.trainer import bf16_supported

    result = tune(TINY, shapes, "linear_probe", epochs=4, lr=1e-2, precision="bf16", out=tmp_path / "bf16")
    losses = result.train.epoch_losses
    assert result.train.bf16 and result.train.precision == "bf16" and result.train.autocast == "bf16"
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "pet.safetensors").values()} == {torch.float32}
    auto = tune(TINY, shapes, "linear_probe", shots=8, epochs=1, out=tmp_path / "auto")
    assert auto.train.precision == "auto" and auto.train.bf16 == bf16_supported(torch.device("cpu"))
    with pytest.raises(RunError, match="precision must be one of"):
        tune(TINY, shapes, "linear_probe", epochs=1, precision="half", out=tmp_path / "never")

def test_a_run_out_of_gpu_time_is_scored_saved_and_says_so(shapes, tmp_path):
    import time

    # The trainer's own test stops mid-run; here the grant is over before the first step.
    result = tune(TINY, shapes, "lora", shots=8, epochs=3, lr=1e-2, out=tmp_path / "run",
                  deadline=time.monotonic() - 1)
    assert result.train.out_of_time and not result.train.step_losses
    assert "stopped at the GPU time limit after 0 of" in result.note
    assert (tmp_path / "run" / "pet.safetensors").exists() and result.tuned["t2i_r1"] >= 0


@pytest.mark.parametrize("model, method", [("tiny", "aurora"), ("tiny", "lora"), ("tiny", "vlpet"), ("tiny", "bitfit"),
                                           ("blip", "aurora")])
def test_frozen_weights_cast_once_train_bit_for_bit_as_casting_them_at_every_step(
        shapes, tiny_blip_folder, tmp_path, monkeypatch, model, method):
    """Under bf16 autocast the frozen weights only linear layers read are cast once for the training
    (and the range test), not at every step: the same values, so the same run to the last bit."""
    from core.trainer import LowPrecisionWeights

    spec = TINY if model == "tiny" else f"blip:{tiny_blip_folder}"
    cast, enter = [], LowPrecisionWeights.__enter__
    with monkeypatch.context() as counting:
        counting.setattr(LowPrecisionWeights, "__enter__", lambda self: cast.append(len(self._weights)) or enter(self))
        once = tune(spec, shapes, method, shots=4, epochs=2, lr="auto", seed=1, precision="bf16",
                    out=tmp_path / "once")
    assert cast and min(cast) > 0   # the test and every step ran with weights cast once
    monkeypatch.setattr(LowPrecisionWeights, "__enter__", lambda self: self)   # autocast casts them each time
    each = tune(spec, shapes, method, shots=4, epochs=2, lr="auto", seed=1, precision="bf16", out=tmp_path / "each")
    assert once.train.lr_choice.losses == each.train.lr_choice.losses
    assert once.train.step_losses == each.train.step_losses and once.tuned == each.tuned


def test_only_frozen_weights_read_by_linear_layers_alone_are_cast_and_only_while_training(tiny):
    """The projections of the blocks every step runs again; not what the frozen-feature cache computes
    once (a linear probe's towers), not a weight tied to an embedding, and only inside `with`."""
    from core.pet import attach
    from core.tasks.retrieval import RetrievalObjective, RetrievalSet
    from core.trainer import LowPrecisionWeights

    data = RetrievalSet(torch.randn(4, 3, 32, 32), tiny.tokenize(["a", "b", "c", "d"]), torch.arange(4))
    probe = attach(tiny, "linear_probe")
    assert LowPrecisionWeights(RetrievalObjective(tiny, data, probe), "bf16")._weights == []
    probe.detach()
    handle = attach(tiny, "bitfit")   # biases train in every block; the weights stay frozen
    linears = list({id(p.linear.weight): p.linear.weight for tower in tiny.towers.values() for block in tower.blocks
                    for p in block.projections.values()}.values())   # q, k and v share one
    tiny.tied = nn.Embedding(*linears[0].shape)
    tiny.tied.weight = linears[0]   # read at full precision by the embedding
    cast = LowPrecisionWeights(RetrievalObjective(tiny, data, handle), "bf16")
    assert len(linears) == 16 and [id(p) for p, _, _ in cast._weights] == [id(w) for w in linears[1:]]
    with cast:
        assert all(w.dtype == torch.bfloat16 for w in linears[1:]) and linears[0].dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in handle.trainable_parameters().values())
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    assert LowPrecisionWeights(RetrievalObjective(tiny, data, handle), None)._weights == []   # fp32: nothing


def test_weights_are_as_they_were_while_an_epoch_is_scored_and_callbacks_run():
    from core.backbones import load_backbone
    from core.pet import attach
    from core.tasks.retrieval import RetrievalObjective, RetrievalSet

    backbone = load_backbone(TINY, seed=0)
    handle = attach(backbone, "lora")
    data = RetrievalSet(torch.randn(8, 3, 32, 32), backbone.tokenize([f"thing {i}" for i in range(8)]), torch.arange(8))
    objective, dtypes = RetrievalObjective(backbone, data, handle), []
    seen = lambda *_: dtypes.append({p.dtype for p in backbone.parameters()})   # noqa: E731
    train(objective, handle.trainable_parameters(), TrainSettings(lr=1e-2, epochs=2, batch_size=4, autocast="bf16"),
          progress=seen, cancel=lambda: seen() or False, epoch_end=seen)
    assert len(dtypes) > 6 and all(d == {torch.float32} for d in dtypes)
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
