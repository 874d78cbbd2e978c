"""The one training loop, for every method and task.

AdamW over the trainable parameters only, linear warm-up then cosine decay by step, gradient
clipping, seeded shuffling, optional bf16 autocast, a progress callback and a cancel flag.
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
    bf16: bool = False


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


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively (CPUs with avx512_bf16 or AMX, GPUs from Ampere);
    elsewhere bf16 is emulated, correct but slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# Training precision: auto is bf16 autocast where the hardware computes it natively, fp32 elsewhere;
# bf16 is asked for explicitly (emulated where not native). Parameters and optimiser state stay fp32.
PRECISIONS = ("auto", "fp32", "bf16")


def uses_bf16(precision: str, device: torch.device) -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {str(precision)[:20]!r}")
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))


def make_optimizer(params: dict[str, nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]   # biases, norms, scales
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)


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
          epoch_end: Optional[Callable[[int], None]] = None) -> TrainLog:
    """Train `params` (already marked trainable) by minimising objective(batch).

    `objective.batches(batch_size, generator)` gives one epoch's batches; `epoch_end(epoch)`
    runs after each epoch (the objective back in eval mode meanwhile).
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
    log, start, step = TrainLog(), time.perf_counter(), 0
    objective.train()
    try:
        for epoch in range(settings.epochs):
            batches = my_batches(generator)
            epoch_losses = []
            for batch in batches:
                if cancel is not None and cancel():
                    log.cancelled = True
                    return log
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                    loss = model(batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); "
                                           f"try a lower learning rate (now {settings.lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                log.step_losses.append(loss.item())
                epoch_losses.append(loss.item())
                if progress is not None:
                    progress(Progress(step, total, epoch + 1, loss.item(), time.perf_counter() - start))
            log.epoch_losses.append(sum(epoch_losses) / max(1, len(epoch_losses)))
            if epoch_end is not None:
                objective.eval()
                epoch_end(epoch + 1)
                objective.train()
    finally:
        objective.eval()
        log.seconds = time.perf_counter() - start
    return log
