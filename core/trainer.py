"""The one training loop, for every method and task.

AdamW over the trainable parameters only, linear warm-up then cosine decay by step, gradient
clipping, seeded shuffling, optional bf16 or fp16 autocast (fp16 with a gradient scaler), a
progress callback, a cancel flag and a deadline. The loop never waits on the device for its own
bookkeeping: losses stay on the device and reach the host once per logging interval.
A run that diverges — a loss that is not finite, a loss whose median over the guard's window (the
last `guard_window` steps: 10, or a third of a shorter run's, at least 5) climbs to DIVERGED_RISE
times the untrained weights' mean loss over one epoch (measured first, without gradients) and
DIVERGED_MARGIN above it, or embeddings that collapse (the median spread of a batch's logits below
COLLAPSED of the untrained weights' and either below NEAR_CONSTANT, or below NEAR_UNIFORM with the
loss at chance's; or the median spread of a batch's distinct media below MEDIA_COLLAPSED of the
untrained weights') — goes back to its best weights so far (the end of the epoch with the lowest
mean loss, once the batch after it showed them sound) and trains the epochs left at a third of the
learning rate, at most `restarts` times; a restart that diverges again before it finished an epoch
from those weights goes back to the untrained weights next (those best weights are taken as
unsound).
Under torchrun / accelerate (torch.distributed initialised) the objective is wrapped in DDP,
`batch_size` is per process, and each process takes its slice of every global batch (batch size ×
processes): with the retrieval objective's gathered negatives, N processes × batch B train as one
process × batch N·B.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import nn

from core.distributed import mean_across_processes, rank_and_world

DIVERGED_RISE = 1.5   # a loss (the window's median) this many times the untrained weights' loss is a run going wrong
DIVERGED_MARGIN = 0.5  # and at least this much above it (in nats: a loss near 0, as small batches give, doubles by chance)
# The guard judges the median of its window of steps, never a mean: one small batch's loss can be 0
# or 4.5 by which pairs it drew (a batch of 2 on the offline world, at any rate), and one such batch
# lifts a moving average past the margin as surely as a run that diverges; half the window cannot.
# A short run is judged over a third of its steps, at least MIN_WINDOW: over 10, a 15-step run (16
# shots) is seen only from its tenth step, and a collapse in its last third never holds the median
# (retrieval with Aurora at 0.1 on novel colours, seed 2: at chance's loss from step 9, 4% R@1).
WINDOW, MIN_WINDOW = 10, 5
RESTART_FACTOR = 3.0  # a restart divides the learning rate by this
# A collapse: the median spread of a batch's logits (core.tasks.encoding.similarity_spread) both near
# constant — every candidate scoring alike — and fallen from the untrained weights'. Either alone misleads:
# learning VQA first shrinks an overconfident model's spread tenfold (to ~2 logits, never near 0), and a
# random-init model can start near 0.
NEAR_CONSTANT = 0.1   # logits
COLLAPSED = 0.2       # of the untrained weights' spread
# A model that starts worse than chance (VQA's overconfident logits) collapses onto chance instead:
# its candidates scored almost alike (spread ~0.2 on the offline world: Aurora at 3e-2, LoRA at 9e-2)
# with the loss's median no more than AT_CHANCE below the loss of scoring them exactly alike, while it
# falls to chance and below on the way to learning with a spread above 1.3.
NEAR_UNIFORM = 0.5    # logits
AT_CHANCE = 0.05      # of chance's loss (the objective's `chance_loss`)
# A partial collapse leaves the logits apart and brings the pictures together: VQA with Aurora at 1e-2
# on the offline world's whole split (bf16) kept a batch's logit spread at 1.4–5.8 (the colour answers
# stay apart) while the mean 1 − cosine of its distinct pictures (core.tasks.encoding.batch_media_spread)
# fell from 0.87 to 0.01–0.03 for 150 steps (about 0.011× at its lowest), and it ended at 55% against
# 78–82% for the runs that did not. Runs seen to learn came no closer than 0.047× (whole split) and
# 0.033× (16 shots, the adapter at 3e-2, above its best rate); full fine-tuning at a too-high rate,
# 0.0001–0.01×. Shallower dips are left to the end-of-run flag (core.result.COLLAPSED_SPREAD).
MEDIA_COLLAPSED = 0.02   # of the untrained weights' spread of a batch's distinct media


class TrainingDiverged(RuntimeError):
    """Training diverged at every learning rate it was allowed to try; the message says where
    and what to try."""


class _Diverging(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


@dataclass
class TrainSettings:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.05
    warmup: float = 0.1           # fraction of all steps
    grad_clip: float = 1.0
    seed: int = 0
    autocast: Optional[str] = None   # "bf16" or "fp16"; None trains in fp32
    log_every: int = 0               # steps between progress reports (0: every step on a CPU, 10 on a GPU)
    restarts: int = 2                # a diverging run restarts at a third of the lr at most this often


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: int
    loss: float
    elapsed: float      # since this attempt began
    first_step: int = 0  # the step this attempt began after (a restart keeps the steps before it)

    @property
    def eta(self) -> float:
        done = self.step - self.first_step
        return self.elapsed / done * (self.total_steps - self.step) if done else float("nan")


@dataclass
class TrainLog:
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0        # training's own time, restarted attempts' too (epoch_end's scorings left out)
    steps_run: int = 0          # every step taken, restarted attempts' too
    cancelled: bool = False
    out_of_time: bool = False   # stopped at the deadline
    steps: int = 0              # steps taken
    total_steps: int = 0        # steps planned
    lr: float = 0.0             # the learning rate of the attempt that finished
    restarts: list[dict] = field(default_factory=list)   # {lr, step, reason, restarted_at, from_epoch} per divergence
    ends: list[int] = field(default_factory=list)        # the step each finished epoch ended at

    def keep_epochs(self, epochs: int) -> None:
        """Forget what came after the first `epochs` epochs (a restart goes back to their end)."""
        kept = self.ends[epochs - 1] if epochs else 0
        del self.step_losses[kept:], self.epoch_losses[epochs:], self.ends[epochs:]
        self.steps = kept


def restart_note(restarts: list[dict]) -> Optional[str]:
    """What the divergence guard did, in words ("lr 0.03 diverged at step 40 (…); restarted at 0.01
    from epoch 2's weights")."""
    return "; ".join(f"lr {r['lr']:.3g} diverged at step {r['step']} ({r['reason']}); "
                     + (f"restarted at {r['restarted_at']:.3g} from " if r["restarted_at"] is not None else
                        "the run had been stopped there, and ends at ")
                     + _weights_of(r.get("from_epoch", 0)) for r in restarts) or None


def _weights_of(epoch: int) -> str:
    return f"epoch {epoch}'s weights" if epoch else "the untrained weights"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively (CPUs with avx512_bf16 or AMX, GPUs from Ampere);
    elsewhere bf16 is emulated, correct but slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# Training precision: auto is bf16 autocast where the hardware computes it natively, else fp16 with
# a gradient scaler on a GPU (every CUDA GPU computes fp16 natively), else fp32; bf16 and fp16 are
# asked for explicitly (emulated where not native). Parameters and optimiser state stay fp32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device) -> Optional[str]:
    """The autocast a precision asks for on `device`: "bf16", "fp16" or None (fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {str(precision)[:20]!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp16" if device.type == "cuda" else None
    return None if precision == "fp32" else precision


def autocast(device: torch.device, amp: Optional[str]) -> torch.autocast:
    """Autocast to `amp` ("bf16", "fp16"), or a disabled one for fp32."""
    return torch.autocast(device.type, dtype=_DTYPES.get(amp, torch.float32), enabled=amp is not None)


class LowPrecisionWeights:
    """Under low-precision autocast, the frozen weights that only linear layers read, cast once for
    a whole training rather than at every step (autocast keeps its casts only of weights that need
    gradients): the values autocast would cast them to, so training is bit for bit the same, and a
    ViT-B/32 step of Aurora, LoRA or VL-PET up to 10% faster (README "Nothing computed twice"). Only the
    projections of the blocks every step runs again (from each tower's first block that depends on
    training: those below it are computed once, core.tasks.frozen), so nothing is held that a step
    would not have cast anyway. A snapshot of weights that stay frozen for the training. In force
    inside `with`, which must hold a forward pass and its backward pass together (the backward reads
    what the forward saw); outside it every weight is as it was."""

    def __init__(self, model: nn.Module, amp: Optional[str]):
        dtype = _DTYPES.get(amp)
        towers = getattr(getattr(model, "backbone", None), "towers", {})
        live = {id(projection.linear): projection.linear for tower in towers.values() for block in tower.blocks
                if block.index >= tower.first_live_block() for projection in block.projections.values()}
        owners: dict[nn.Parameter, list[nn.Module]] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(p, []).append(module)
        # a weight tied to another kind of layer (an embedding) is read at full precision there
        self._weights = [(linear.weight, linear.weight.data, linear.weight.data.to(dtype)) for linear in live.values()
                         if dtype is not None and not linear.weight.requires_grad
                         and linear.weight.dtype == torch.float32
                         and all(isinstance(m, nn.Linear) and m.weight is linear.weight
                                 for m in owners.get(linear.weight, []))]

    def __enter__(self) -> "LowPrecisionWeights":
        for p, _, low in self._weights:
            p.data = low
        return self

    def __exit__(self, *exc) -> None:
        for p, full, _ in self._weights:
            p.data = full


def make_optimizer(params: dict[str, nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]   # biases, norms, scales
    # The fused kernel reads the step count where it lives: the unfused one reads it with .item() per parameter.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params.values())
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, fused=fused or None)


def process_batches(objective: nn.Module, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """This process's slice of each global batch of `objective` (batch size × processes, trimmed to
    a multiple of the processes so that every process gathers the same number of pairs)."""
    rank, world = rank_and_world()
    return [b[:len(b) - len(b) % world].tensor_split(world)[rank]
            for b in objective.batches(batch_size * world, generator) if len(b) >= world]


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: dict[str, nn.Parameter], grad_clip: float) -> None:
    """Backward from `loss`, gradients clipped to `grad_clip` (0: not), one optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _schedule(optimizer, total_steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Guard:
    """What the divergence guard measures against and goes back to: the untrained weights' mean loss,
    logit spread, media spread and chance's loss over an epoch (measured first, without gradients),
    and the best weights so far — those at the end of the epoch with the lowest mean training loss,
    once the first batch after it has shown them `sound` (an epoch's mean can be low while a high
    rate leaves its last weights broken); the untrained weights until an epoch qualifies, and again
    after `forget_best`. An epoch's mean loss chooses, not one batch's: a collapsed model can score
    one small batch well. The candidate and the best are a copy each, beside the untrained one."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.untrained = {n: p.detach().clone() for n, p in params.items()}
        self.loss: Optional[float] = None
        self.spread = math.nan          # NaN where the objective has no similarities to watch
        self.chance = math.nan          # chance's loss (its mean over the epoch), NaN where the objective does not know it
        self.media_spread = math.nan    # a batch's distinct media's spread, NaN where the objective does not say it
        self.best: Optional[dict[str, torch.Tensor]] = None
        self.best_epoch, self.best_loss = 0, math.inf
        self.candidate: Optional[dict[str, torch.Tensor]] = None
        self.candidate_epoch, self.candidate_loss = 0, math.inf
        self.check_step: Optional[int] = None   # the step whose loss tells on the candidate

    @torch.no_grad()
    def consider(self, epoch: int, loss: float, next_step: int) -> None:
        """Epoch `epoch` ended with mean loss `loss`: keep its weights as the candidate if it is the lowest."""
        if loss < min(self.best_loss, self.loss):
            if self.candidate is None:
                self.candidate = {n: p.detach().clone() for n, p in self.params.items()}
            else:
                for name, p in self.params.items():
                    self.candidate[name].copy_(p)
            self.candidate_epoch, self.candidate_loss, self.check_step = epoch, loss, next_step

    def collapsed(self, spread: float, loss: float, chance: float) -> bool:
        """Whether a batch's logit spread (with its loss against chance's, where the objective knows
        it) says the embeddings collapsed (never where the spread or the untrained one is NaN)."""
        return spread < COLLAPSED * self.spread and (
            spread < NEAR_CONSTANT or (spread < NEAR_UNIFORM and loss >= (1 - AT_CHANCE) * chance))

    def media_collapsed(self, media_spread: float) -> bool:
        """Whether a batch's distinct media sit so close that the media embeddings collapsed (never
        where either spread is NaN)."""
        return media_spread < MEDIA_COLLAPSED * self.media_spread

    def sound(self, loss: float, spread: float, chance: float, media_spread: float) -> bool:
        """Whether a batch's numbers show the weights it ran on worth going back to: a loss no worse
        than the untrained weights', neither its logits nor its media collapsed, and below chance's
        for a model that started worse than chance (weights at chance's loss have learned only to
        flatten its logits, and a restart from them collapses again: VQA with Aurora at 3e-2 on the
        offline world, twice, from epoch 3)."""
        only_flattened = self.loss > self.chance and loss >= (1 - AT_CHANCE) * chance   # False where chance is NaN
        return loss <= self.loss and not only_flattened and not self.collapsed(spread, loss, chance) \
            and not self.media_collapsed(media_spread)

    def settle(self, fine: bool) -> None:
        """The first batch after the candidate's epoch said whether its weights are `fine`: if so, they are the best."""
        if fine:
            self.best, self.candidate = self.candidate, self.best
            self.best_epoch, self.best_loss = self.candidate_epoch, self.candidate_loss
        self.check_step = None

    @torch.no_grad()
    def restore(self) -> int:
        """The best weights so far put back; the epochs they had trained (0: the untrained weights)."""
        source = self.best if self.best is not None else self.untrained
        for name, p in self.params.items():
            p.copy_(source[name])
        self.check_step = None
        return self.best_epoch

    def forget_best(self) -> None:
        """A restart from the best weights diverged again before it finished an epoch: take them as
        unsound (an epoch's end can pass one batch and overflow on the next) and go back to the
        untrained weights from now on, until an epoch qualifies again."""
        self.best, self.best_epoch, self.best_loss = None, 0, math.inf
        self.candidate, self.check_step = None, None


def guard_window(total_steps: int) -> int:
    """How many of the last steps the guard judges in a run of `total_steps`: WINDOW, or a third of
    a short run's steps (at least MIN_WINDOW)."""
    return max(MIN_WINDOW, min(WINDOW, total_steps // 3))


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether any process raised `flag`, so that all act on it together (restart, stop)."""
    if rank_and_world()[1] == 1:
        return flag
    import torch.distributed as dist

    shared = torch.tensor([float(flag)], device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return bool(shared.item())


def train(objective: nn.Module, params: dict[str, nn.Parameter], settings: TrainSettings,
          progress: Optional[Callable[[Progress], None]] = None,
          cancel: Optional[Callable[[], bool]] = None,
          epoch_end: Optional[Callable[[int], None]] = None,
          deadline: Optional[float] = None) -> TrainLog:
    """Train `params` (already marked trainable) by minimising objective(batch).

    `objective.batches(batch_size, generator)` gives one epoch's batches; an objective may keep
    `last_spread`, its last batch's logit spread (core.tasks.encoding.similarity_spread), and
    `last_media_spread`, its distinct media's (core.tasks.encoding.batch_media_spread), for the
    guard to watch. `epoch_end(epoch)` runs after each epoch (the objective back in eval mode
    meanwhile; after a restart it is called again from the epoch the run went back to). At
    `deadline` (a time.monotonic() value) training stops before its next step, as a cancel does,
    and the log says so (`out_of_time`). A run that diverges goes back to its best weights so far
    and trains the epochs left at a third of the lr (`log.restarts` says when, why and from where);
    when a restart diverges again within its first epoch, the next one starts from the untrained
    weights and trains every epoch. One that still diverges after `settings.restarts` restarts
    raises TrainingDiverged.
    """
    if not params:
        raise ValueError("nothing to train: the method has no trainable parameters")
    guard, restarts, lr, log = _Guard(params), [], settings.lr, TrainLog()
    while True:
        try:
            _attempt(objective, params, replace(settings, lr=lr), guard, log, progress, cancel, epoch_end, deadline)
        except _Diverging as diverging:
            # a cancel's or the deadline's last report found it: the run goes back to its best weights
            # and ends there (an attempt at a lower rate would take no step)
            stopped = log.cancelled or log.out_of_time
            if len(restarts) >= settings.restarts and not stopped:
                tried = restart_note(restarts)
                raise TrainingDiverged(f"{diverging.reason} at step {diverging.step} with lr {lr:.3g}"
                                       f"{f' (before that: {tried})' if tried else ''}; try a lower learning rate, "
                                       f"or check the data") from None
            if restarts and restarts[-1]["from_epoch"] and len(log.epoch_losses) == restarts[-1]["from_epoch"]:
                guard.forget_best()   # the last restart went back to these weights and diverged within an epoch
            kept = guard.restore()
            log.keep_epochs(kept)
            restarts.append({"lr": lr, "step": diverging.step, "reason": diverging.reason,
                             "restarted_at": None if stopped else lr / RESTART_FACTOR, "from_epoch": kept})
            if stopped:
                log.lr, log.restarts = lr, restarts
                return log
            lr /= RESTART_FACTOR
            continue
        log.lr, log.restarts = lr, restarts
        return log


def _attempt(objective: nn.Module, params: dict[str, nn.Parameter], settings: TrainSettings, guard: _Guard,
             log: TrainLog, progress, cancel, epoch_end, deadline) -> None:
    """Train at settings.lr from the end of the epochs `log` keeps to the last epoch, adding to `log`;
    raises _Diverging when the run goes wrong."""
    model = nn.parallel.DistributedDataParallel(objective) if rank_and_world()[1] > 1 else objective
    device = next(iter(params.values())).device
    generator = torch.Generator().manual_seed(settings.seed)

    def my_batches(seeded: torch.Generator) -> list[torch.Tensor]:
        return process_batches(objective, settings.batch_size, seeded)

    per_epoch = len(my_batches(torch.Generator().manual_seed(0)))
    done = len(log.epoch_losses)
    for _ in range(done):   # the kept epochs' draws: each epoch after them sees the batches it would have
        my_batches(generator)
    step = log.steps = first_step = len(log.step_losses)
    log.total_steps = total = max(1, per_epoch * settings.epochs)
    optimizer = make_optimizer(params, settings)
    scheduler = _schedule(optimizer, max(1, total - step), settings.warmup)   # a restart warms up again
    scaler = torch.amp.GradScaler(device.type, enabled=settings.autocast == "fp16")
    log_every = settings.log_every or (1 if device.type == "cpu" else 10)
    start, scored = time.perf_counter(), 0.0
    unknown = torch.tensor(math.nan, device=device)
    # (loss, spread, chance's loss, media spread) of the steps not yet reported, still on the device
    pending: list[torch.Tensor] = []
    # this attempt's last losses, logit spreads with their batches' loss and chance's, and media spreads
    # (a batch with nothing to watch — one candidate, a generated answer, one medium: NaN — left out)
    window = guard_window(total)
    recent = {key: deque(maxlen=window) for key in ("loss", "spread", "watched loss", "chance", "media spread")}

    def stopping() -> bool:
        """A cancel or the deadline; under torchrun agreed by every process, once per logging interval
        (a process that stopped alone would leave the others waiting in a collective)."""
        if rank_and_world()[1] > 1 and step % log_every:
            return False
        log.cancelled = any_process(cancel is not None and cancel(), device)
        log.out_of_time = any_process(deadline is not None and time.monotonic() >= deadline, device)
        return log.cancelled or log.out_of_time

    def measured(loss: torch.Tensor) -> torch.Tensor:
        spread, chance = getattr(objective, "last_spread", None), getattr(objective, "chance_loss", None)
        media_spread = getattr(objective, "last_media_spread", None)
        return torch.stack([loss.detach().float(), unknown if spread is None else spread.float(),
                            unknown if chance is None else torch.full((), float(chance), device=device),   # a fill: no copy to wait on
                            unknown if media_spread is None else media_spread.float()])

    def diverging(rows: list[list[float]], first: int) -> Optional[_Diverging]:
        for at_step, (value, spread, chance, media_spread) in enumerate(rows, start=first):
            if not math.isfinite(value):
                return _Diverging(at_step, f"the loss became {value}")
            recent["loss"].append(value)
            if math.isfinite(spread):
                recent["spread"].append(spread)
                recent["watched loss"].append(value)
                recent["chance"].append(chance)   # NaN where the objective does not know it: never at chance
            if math.isfinite(media_spread):
                recent["media spread"].append(media_spread)
            if len(recent["loss"]) == window and (level := statistics.median(recent["loss"])) > max(
                    DIVERGED_RISE * guard.loss, guard.loss + DIVERGED_MARGIN):
                rise = f"{level / guard.loss:.1f}× the untrained weights' loss" if guard.loss >= 1 else \
                    f"{level:.3g}, {level - guard.loss:.3g} nats above the untrained weights' {guard.loss:.3g}"
                return _Diverging(at_step, f"the loss's median over {window} steps rose to {rise}")
            if len(recent["spread"]) == window:
                spread_level, loss_level, chance_level = (statistics.median(recent[key]) for key in
                                                          ("spread", "watched loss", "chance"))
                if guard.collapsed(spread_level, loss_level, chance_level):
                    at_chance = "" if spread_level < NEAR_CONSTANT else \
                        f", the loss's median {loss_level:.3g} at chance's {chance_level:.3g}: every candidate scored alike"
                    return _Diverging(at_step, f"the embeddings collapsed (the median spread of a batch's logits fell to "
                                               f"{spread_level:.2g}, {spread_level / guard.spread:.2g}× the untrained "
                                               f"weights'{at_chance})")
            if len(recent["media spread"]) == window and guard.media_collapsed(
                    level := statistics.median(recent["media spread"])):
                return _Diverging(at_step, f"the media embeddings collapsed (the median spread of a batch's media "
                                           f"fell to {level:.2g}, {level / guard.media_spread:.2g}× the untrained "
                                           f"weights')")
        return None

    def report() -> None:
        """The pending losses to the host in one transfer: logged, checked, reported."""
        rows = torch.stack([*pending, *untrained]).tolist()
        if untrained:   # it rode along with the first report's losses
            guard.loss, guard.spread, guard.chance, guard.media_spread = rows.pop()
            untrained.clear()
        first = step - len(rows) + 1
        pending.clear()
        if guard.check_step is not None and first <= guard.check_step < first + len(rows):
            guard.settle(not any_process(not guard.sound(*rows[guard.check_step - first]), device))
        wrong = diverging(rows, first)
        if any_process(wrong is not None, device):
            raise wrong or _Diverging(first, "another process's loss went wrong")
        log.step_losses.extend(row[0] for row in rows)
        if progress is not None:
            progress(Progress(step, total, len(log.epoch_losses) + 1, rows[-1][0], time.perf_counter() - start,
                              first_step))

    objective.train()
    low_precision = LowPrecisionWeights(objective, settings.autocast)
    untrained: list[torch.Tensor] = []
    if guard.loss is None:   # what a rise and a collapse are measured against, over one epoch
        # (its random draws, e.g. dropout's, are given back: the training that follows is the same with or without it)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                autocast(device, settings.autocast), low_precision:
            at_start = torch.stack([measured(model(batch)) for batch in my_batches(torch.Generator().manual_seed(0))])
            # the reference is the finite losses' mean: a batch the untrained weights cannot score (NaN, inf)
            # must not switch the guard off (training on it says so at its step); a NaN spread is a batch
            # with nothing to watch
            losses = at_start[:, 0]
            at_start = torch.stack([losses.where(losses.isfinite(), math.nan).nanmean(), *at_start[:, 1:].nanmean(dim=0)])
            untrained.append(mean_across_processes(at_start))   # every process judges alike
    try:
        for epoch in range(done + 1, settings.epochs + 1):
            for batch in my_batches(generator):
                if stopping():
                    break
                with low_precision:   # not around a callback: `progress` and `cancel` see the weights as they are
                    with autocast(device, settings.autocast):
                        loss = model(batch)
                    optimizer_step(loss, optimizer, scaler, params, settings.grad_clip)
                scheduler.step()
                step = log.steps = step + 1
                log.steps_run += 1
                pending.append(measured(loss))
                if len(pending) >= log_every:
                    report()
            if log.cancelled or log.out_of_time:
                break
            if pending:
                report()
            epoch_start = log.ends[-1] if log.ends else 0
            losses = log.step_losses[epoch_start:]
            epoch_loss = float(mean_across_processes(torch.tensor(sum(losses) / max(1, len(losses)), device=device)))
            log.ends.append(step)
            log.epoch_losses.append(epoch_loss)
            guard.consider(epoch, epoch_loss, step + 1)
            if epoch_end is not None:
                objective.eval()
                scoring = time.perf_counter()
                epoch_end(epoch)
                scored += time.perf_counter() - scoring
                objective.train()
        if pending:
            report()
    finally:
        objective.eval()
        log.seconds += time.perf_counter() - start - scored
