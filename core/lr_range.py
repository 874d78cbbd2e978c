"""The learning rate found on the user's own data: a range test (Smith, "Cyclical learning rates",
2017; fastai's lr_find), on one fixed batch.

From the PET parameters' initial values, AdamW steps on one fixed batch of training items while
the learning rate rises geometrically from LOWEST to HIGHEST. One fixed batch makes the curve
the learning rate's alone: cycling small batches, the loss moves with how hard each batch is more
than with the rate. The test stops once the loss turns up (below), is not finite or passes
BLOW_UP times its start.

The rule: the loss must first fall (by FALL of its start, or of chance's loss when the model starts
worse than chance — `objective.chance_loss`, where the objective knows it); it "turns up" at the
first step whose loss gives back TURN of what it had gained below that, or is not finite. The chosen learning rate is the
geometric middle of the first one on the valley's floor — the first whose loss came within FLOOR
of the lowest before the turn, as a share of the whole fall — and the one where it turned up (that
first one alone when it never turned up). Trained with warm-up and cosine decay, a run's best
peak rate sits above the one step that did best here: on the offline world's curves the best
fixed rate lay between the lowest point and the turn, and the lowest point alone chose a rate below
it. On a flat floor which step is lowest is chance (a loss of 0.447 at 0.051 against 0.478 at
0.021), and reading the lowest there chose rates up to a method's cliff (LoRA at 0.079, its cliff
at 0.1). A model that starts worse than chance is judged otherwise: its chosen rate is the first
at which the loss fell FALL below chance's, where the test stops. Its lower rates only flatten its overconfident logits,
and past that one a step on one small batch measures how fast the batch is memorised: on the
offline world's VQA the lowest point lay 3–30× above the best fixed rate (rule 4 chose 0.066–0.3
where 0.01–0.03 was best). One whose loss never fell FALL below chance's shows only its logits
flattening, and learns at a rate one step on one batch cannot show (LoRA's and Aurora's VQA: a
factor that starts at zero moves the loss late): it takes the guard's restart factor
(core.trainer.RESTART_FACTOR) times the suggested rate, so that a run that collapses there restarts
at the suggested rate (VQA on the offline world's novel colours at 16 shots, where the test kept the
suggested 0.01: 0.03 was best for LoRA, Aurora and ProLIP), unless the test's loss blew up at the
first rate it tried at or above that, or the test stopped below it.
Any other loss that never falls (a batch the model already separates) keeps the suggested rate, and
says so.
Then the initial weights are put back, so the run trains from where it would have started.

Size: STEPS steps on a batch of BATCH items when that fits in SHARE of the items the run's
training processes; a short run gets fewer steps and a smaller batch, down to MIN_STEPS of
MIN_BATCH — the least that measures anything. A run too short even for that (a few-shot run of a
few epochs) drops as many of the test's lowest rates as it is over its share, but only those below
ENTER of the suggested rate, where the loss moves little, so the rates that decide keep their
places; past that it exceeds its share (LrChoice.share says what it cost).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import MutableMapping
from dataclasses import asdict, replace
from typing import Callable, Optional

import torch
from torch import nn

from core.cache import JsonCache
from core.distributed import mean_across_processes, rank_and_world
from core.result import LrChoice, read_record
from core.trainer import (RESTART_FACTOR, LowPrecisionWeights, TrainSettings, any_process, autocast, make_optimizer,
                          optimizer_step, process_batches)

SHARE = 0.15          # of the run's training items (epochs × items) the test should use
STEPS, BATCH = 20, 16
MIN_STEPS, MIN_BATCH = 14, 8
LOWEST, HIGHEST = 3e-6, 0.3
BLOW_UP = 4.0         # the test stops once the loss passes this many times its start
FALL = 0.1            # the loss must fall by this share of its start for the test to say anything
TURN = 0.25           # it turns up once it gives back this share of what it had gained
FLOOR = 0.1           # a loss within this share of the whole fall of the lowest is on the valley's floor
ENTER = 0.01          # a test over its share drops its rates below this share of the suggested one
RULE = 7              # the rule's version: with the constants above, in the cache key (a changed rule reuses no choice)
# a new constant joins them too
RULE_CONSTANTS = (SHARE, STEPS, BATCH, MIN_STEPS, MIN_BATCH, LOWEST, HIGHEST, BLOW_UP, FALL, TURN, FLOOR, ENTER,
                  RESTART_FACTOR, RULE)


def rising_rates(steps: int) -> list[float]:
    """`steps` learning rates rising geometrically from LOWEST to HIGHEST."""
    return [LOWEST * (HIGHEST / LOWEST) ** (step / max(1, steps - 1)) for step in range(steps)]


def plan(items_per_epoch: int, epochs: int, batch_size: int, suggested: float) -> tuple[list[float], int]:
    """(the rates the test steps at, its batch size): the largest test within SHARE of the run's
    training, at least the least that measures anything (the batch never above the data or the
    training's batch, except that it is never below 2: a contrastive loss needs a negative), less its
    lowest rates while it is over its share and they are below ENTER of the `suggested` rate."""
    budget = SHARE * items_per_epoch * epochs
    largest = max(2, min(BATCH, batch_size, items_per_epoch))
    batch = max(min(largest, MIN_BATCH), min(largest, int(budget // STEPS)))
    steps = int(max(MIN_STEPS, min(STEPS, budget // batch)))
    rates = rising_rates(steps)
    over = steps - int(budget // batch)
    while over > 0 and rates[0] < ENTER * suggested:
        rates, over = rates[1:], over - 1
    return rates, batch


def fell_below(reference: float, loss: float) -> bool:
    """Whether `loss` is FALL below the reference, the least the rule reads as learning."""
    return reference - loss >= FALL * reference


def turn(start: float, losses: list[float]) -> tuple[Optional[int], Optional[int]]:
    """(the step of the lowest loss before the turn, the step where the loss turned up): the first
    None when the loss has not fallen, the second None when it has not turned up."""
    lowest, at = start, None
    for step, loss in enumerate(losses):
        if loss > lowest + TURN * (start - lowest) and fell_below(start, lowest):
            return at, step
        if loss < lowest:
            lowest, at = loss, step
    return (at if fell_below(start, lowest) else None), None


def pick(start: float, lrs: list[float], losses: list[float], not_finite_at: Optional[float] = None,
         worse_than_chance: bool = False) -> tuple[Optional[float], str]:
    """The rule: (lr, why) from the reference loss (the start's, or chance's when that is lower:
    `worse_than_chance`) and the loss after a step at each of `lrs` (and the rate after which it was
    not finite, where the test ended so), or (None, why) when the loss never fell below it."""
    at, turned = turn(start, losses)
    if at is None:
        return None, (f"the loss did not fall {FALL:.0%} below {start:.3g} (the least the rule reads as learning) "
                      f"at any learning rate the test tried")
    if worse_than_chance:
        first = next(step for step, loss in enumerate(losses) if fell_below(start, loss))
        return lrs[first], (f"range test: the model started worse than chance; the loss first fell {FALL:.0%} "
                            f"below chance's {start:.3g} at lr {lrs[first]:.2g}, the rate chosen")
    floor = next(step for step in range(at + 1) if losses[step] <= losses[at] + FLOOR * (start - losses[at]))
    reached = (f"range test: the loss reached its floor (within {FLOOR:.0%} of its fall above its lowest, "
               f"{losses[at]:.3g}) at lr {lrs[floor]:.2g}")
    if turned is None and not_finite_at is None:
        return lrs[floor], f"{reached} (it had not turned up by the end)"
    # a loss gone non-finite has turned up as far as it can
    edge, how = (lrs[turned], "turned up") if turned is not None else (not_finite_at, "was not finite")
    chosen = math.sqrt(lrs[floor] * edge)
    return chosen, f"{reached} and {how} at {edge:.2g}; chose their geometric middle, {chosen:.2g}"


def above_suggested(suggested: float, start: float, lrs: list[float], losses: list[float]) -> tuple[Optional[float], str]:
    """For a model that started worse than chance and never fell FALL below chance's loss: (RESTART_FACTOR
    times the `suggested` rate, why) when the test reached that rate and its loss did not blow up (past
    BLOW_UP times the `start`) at the first rate it tried at or above it; else (None, why not). One
    batch's loss is noisy at these rates (9.97 at 0.049 between 3.5 and 3.0 from a start of 9.77):
    only a blow-up says the rate is too high."""
    bolder = RESTART_FACTOR * suggested
    at = next((step for step, lr in enumerate(lrs) if lr >= bolder), None)
    if at is None:
        return None, f"; the model started worse than chance, and the test stopped below {bolder:.2g}"
    if losses[at] > BLOW_UP * start:
        return None, (f"; the model started worse than chance, and its loss blew up at {lrs[at]:.2g}, the first rate "
                      f"tried at or above {bolder:.2g}")
    return bolder, (f"; the model started worse than chance, and one step on one batch of such a model shows its logits "
                    f"flattening, not the rate it learns at: chose {RESTART_FACTOR:g}× the suggested {suggested:.2g}, "
                    f"{bolder:.2g} (a run that collapses there restarts at {suggested:.2g})")


def range_test(objective: nn.Module, params: dict[str, nn.Parameter], rates: list[float], batch_size: int,
               weight_decay: float, grad_clip: float, autocast_to: Optional[str], seed: int = 0,
               fallback: float = 1e-3, stop: Optional[Callable[[], bool]] = None) -> LrChoice:
    """Run the test on `objective` (one batch of its `batches()`, as the trainer reads them), a step at
    each of `rates` (rising) until the rule has its answer, and put the initial weights back; the
    choice falls back to `fallback` when the loss never fell (RESTART_FACTOR times it for a model that
    started worse than chance: `above_suggested`), and the test ends early when `stop()`
    says so (a cancel, a deadline: `LrChoice.steps` then tells). Under torchrun each process steps
    on its slice of the batch through DDP and their losses are averaged, so every process chooses
    the same rate."""
    started = time.perf_counter()
    initial = {n: p.detach().clone() for n, p in params.items()}
    optimizer = make_optimizer(params, TrainSettings(lr=LOWEST, weight_decay=weight_decay))
    device = next(iter(params.values())).device
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_to == "fp16")
    world = rank_and_world()[1]
    batch = process_batches(objective, batch_size, torch.Generator().manual_seed(seed))[0]
    model = nn.parallel.DistributedDataParallel(objective) if world > 1 else objective   # gradients averaged
    lrs, losses, start, reference, stopped, not_finite_at, worse = [], [], math.nan, math.nan, False, None, False
    objective.train()
    # its random draws (dropout's) are given back: a run trains the same whether its choice was
    # measured now or read from the cache; each step's backward reads the forward before it, so the
    # frozen weights stay cast for the whole test
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            LowPrecisionWeights(objective, autocast_to):
        try:
            with autocast(device, autocast_to):
                loss = model(batch)
            start = float(mean_across_processes(loss.detach().float()))
            # A model that starts worse than chance (VQA's overconfident logits) gains loss by merely
            # flattening them, at any high rate: only a loss below chance's measures learning.
            chance = getattr(objective, "chance_loss", None)
            if chance is not None:   # VQA's depends on each process's slice: every process must judge alike
                chance = float(mean_across_processes(torch.tensor(chance, device=device)))
            worse = chance is not None and start > chance
            reference = chance if worse else start
            for lr in rates if math.isfinite(start) else []:
                stopped = stop is not None and any_process(stop(), device)
                if stopped:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer_step(loss, optimizer, scaler, params, grad_clip)
                with autocast(device, autocast_to):
                    loss = model(batch)   # the loss after a step at `lr`
                value = float(mean_across_processes(loss.detach().float()))
                if not math.isfinite(value):
                    not_finite_at = lr
                    break
                lrs.append(lr)
                losses.append(value)
                if value > BLOW_UP * start or turn(reference, losses)[1] is not None or \
                        (worse and fell_below(reference, value)):   # the rule has its answer
                    break
        finally:
            objective.eval()
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(initial[name])
                    p.grad = None
    fell, turned = turn(reference, losses)
    if stopped:
        chosen, why = None, "stopped before the range test finished"
    elif len(losses) < 3 and turned is None and fell is None:
        chosen, why = None, "the loss was not finite from the start" if not math.isfinite(start) else \
            "the loss blew up at once"
    else:
        chosen, why = pick(reference, lrs, losses, not_finite_at, worse)
        if chosen is None and worse:
            chosen, said = above_suggested(fallback, start, lrs, losses)
            why += said
    if chosen is None:
        chosen, why = fallback, f"{why}; kept the suggested {fallback:.2g}"
    return LrChoice(lr=float(chosen), why=why, lrs=lrs, losses=losses, steps=len(lrs), batch_size=len(batch) * world,
                    seconds=time.perf_counter() - started, finished=not stopped)


def cache_key(backbone, method: str, revision: int, config: dict, dataset_fingerprint: str, task: str,
              frames: int, extra_answers: tuple[str, ...], shots: Optional[int], seed: int,
              autocast_to: Optional[str]) -> tuple:
    """What a range test depends on before it is planned: the backbone's weights, the method (its
    revision) and options, the data (which shots the seed draws), the task, the precision that runs
    and the rule; `choose_lr` adds the plan (its rates, batch and suggested rate), so runs whose
    training differs only in ways the plan does not see (more epochs of a run already over its
    share) share one test."""
    return (backbone.spec, backbone.weights, method, revision, json.dumps(config, sort_keys=True),
            dataset_fingerprint, task, frames, list(extra_answers), shots, seed,
            autocast_to or "fp32", list(RULE_CONSTANTS))   # the spec first, as core.cache reads it


class ChoiceCache(JsonCache):
    """Range tests kept on disk (core.cache): key (`cache_key`) -> LrChoice."""

    def encode(self, choice: LrChoice) -> dict:
        return asdict(choice)

    def decode(self, stored) -> LrChoice:
        choice = read_record(LrChoice, stored, "a cached range test")
        choice.check("a cached range test")
        if not choice.finished:
            raise ValueError("not a learning-rate choice")
        return choice


def choose_lr(objective: nn.Module, params: dict[str, nn.Parameter], settings, fallback: float,
              cache: Optional[MutableMapping] = None, key: Optional[tuple] = None,
              stop: Optional[Callable[[], bool]] = None) -> LrChoice:
    """The learning rate for training `params` on `objective` with `settings` (core.trainer's
    TrainSettings; its lr is not read): the choice cached for `key` (`cache_key`) and the plan, else
    a range test sized by `plan` around the suggested `fallback` (then kept in `cache` when it
    finished); a reused choice's share is of this run's training. Under torchrun the cache is not
    used: every process must run the same test, and a file one process reads another may not."""
    world = rank_and_world()[1]
    if world > 1:
        cache = None
    items = sum(len(b) for b in objective.batches(settings.batch_size * world, torch.Generator().manual_seed(0)))
    # planned as the one process that N processes of batch B train as (batch N·B), then shared out
    # (rounded up to a share each): the test's global batch, so its contrastive negatives, does not
    # depend on how many there are
    rates, batch_size = plan(items, settings.epochs, settings.batch_size * world, fallback)
    training = items * settings.epochs
    if key is not None:
        key = (*key, [len(rates), rates[0], batch_size, fallback])
    if cache is not None and key is not None:
        try:
            kept = cache[key]
            return replace(kept, reused=True, share=kept.steps * kept.batch_size / max(1, training))
        except KeyError:
            pass
    choice = range_test(objective, params, rates, -(-batch_size // world), settings.weight_decay,
                        settings.grad_clip, settings.autocast, settings.seed, fallback, stop)
    choice.share = choice.steps * choice.batch_size / max(1, training)
    if cache is not None and key is not None and choice.finished:
        cache[key] = choice
    return choice
