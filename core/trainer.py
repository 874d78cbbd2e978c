"""The one training loop, for every method and task.

AdamW over the trainable parameters only, linear warm-up then cosine decay by step, gradient
clipping, seeded shuffling, optional bf16 or fp16 autocast (fp16 with a gradient scaler), a
progress callback, a cancel flag and a deadline. The loop never waits on the device for its own
bookkeeping: losses stay on the device and reach the host once per logging interval.
Under torchrun / accelerate (torch.distributed initialised) the objective is wrapped in DDP,
`batch_size` is per process, and each process takes its slice of every global batch (batch size ×
processes): with the retrieval objective's gathered negatives, N processes × batch B train as one
process × batch N·B.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from core.distributed import rank_and_world


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to try."""


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


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: int
    loss: float
    elapsed: float

    @property
    def eta(self) -> float:
        return self.elapsed / self.step * (self.total_steps - self.step) if self.step else float("nan")


@dataclass
class TrainLog:
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False
    out_of_time: bool = False   # stopped at the deadline
    steps: int = 0              # steps taken
    total_steps: int = 0        # steps planned


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


def make_optimizer(params: dict[str, nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]   # biases, norms, scales
    # The fused kernel reads the step count where it lives: the unfused one reads it with .item() per parameter.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params.values())
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, fused=fused or None)


def _schedule(optimizer, total_steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(objective: nn.Module, params: dict[str, nn.Parameter], settings: TrainSettings,
          progress: Optional[Callable[[Progress], None]] = None,
          cancel: Optional[Callable[[], bool]] = None,
          epoch_end: Optional[Callable[[int], None]] = None,
          deadline: Optional[float] = None) -> TrainLog:
    """Train `params` (already marked trainable) by minimising objective(batch).

    `objective.batches(batch_size, generator)` gives one epoch's batches; `epoch_end(epoch)`
    runs after each epoch (the objective back in eval mode meanwhile). At `deadline` (a
    time.monotonic() value) training stops before its next step, as a cancel does, and the log
    says so (`out_of_time`). A non-finite loss raises TrainingDiverged at the report that sees it.
    """
    if not params:
        raise ValueError("nothing to train: the method has no trainable parameters")
    rank, world = rank_and_world()
    model = nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    device = next(iter(params.values())).device
    generator = torch.Generator().manual_seed(settings.seed)

    def my_batches(seeded: torch.Generator) -> list[torch.Tensor]:
        """This process's slice of each global batch (batch size × processes, trimmed to a
        multiple of the processes so that every process gathers the same number of pairs)."""
        global_batches = objective.batches(settings.batch_size * world, seeded)
        return [b[:len(b) - len(b) % world].tensor_split(world)[rank] for b in global_batches if len(b) >= world]

    per_epoch = len(my_batches(torch.Generator().manual_seed(0)))
    total = max(1, per_epoch * settings.epochs)
    optimizer = make_optimizer(params, settings)
    scheduler = _schedule(optimizer, total, settings.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.autocast == "fp16")
    log_every = settings.log_every or (1 if device.type == "cpu" else 10)
    log, start, step = TrainLog(total_steps=total), time.perf_counter(), 0
    pending: list[torch.Tensor] = []   # losses not yet reported, still on the device

    ends: list[int] = []   # the step each finished epoch ended at

    def epoch_of(at_step: int) -> int:
        return 1 + sum(end < at_step for end in ends)

    def report() -> None:
        """The pending losses to the host in one transfer: logged, checked, reported."""
        losses = torch.stack(pending).float().tolist()
        first = step - len(losses) + 1
        pending.clear()
        for at_step, value in enumerate(losses, start=first):
            if not math.isfinite(value):
                raise TrainingDiverged(f"the loss became {value} at step {at_step} (epoch {epoch_of(at_step)}); "
                                       f"try a lower learning rate (now {settings.lr:g})")
        log.step_losses.extend(losses)
        if progress is not None:
            progress(Progress(step, total, epoch_of(step), losses[-1], time.perf_counter() - start))

    objective.train()
    try:
        for epoch in range(1, settings.epochs + 1):
            for batch in my_batches(generator):
                log.cancelled = cancel is not None and cancel()
                log.out_of_time = deadline is not None and time.monotonic() >= deadline
                if log.cancelled or log.out_of_time:
                    break
                with autocast(device, settings.autocast):
                    loss = model(batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if settings.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step = log.steps = step + 1
                pending.append(loss.detach())
                if len(pending) >= log_every:
                    report()
            if log.cancelled or log.out_of_time:
                break
            ends.append(step)
            if epoch_end is not None:
                if pending:
                    report()
                objective.eval()
                epoch_end(epoch)
                objective.train()
        if pending:
            report()
        log.epoch_losses = [sum(log.step_losses[a:b]) / max(1, b - a) for a, b in zip([0, *ends], ends)]
    finally:
        objective.eval()
        log.seconds = time.perf_counter() - start
    return log
