"""The one way onto the device for the app. Every handler that computes with a model — scoring,
tuning, embedding a gallery, searching, answering, reading gates — hands a module-level function
and plain arguments to `on_device`. On a ZeroGPU Space that is one `spaces.GPU` call: a forked
worker that receives the arguments and returns the result pickled, where CUDA exists, and whose
errors reach the visitor only as `gr.Error`. Elsewhere it is a plain call in the handler's own
thread, so the Gradio request (ZeroGPU finds the visitor by it) is there either way. Models wait
on the CPU between calls (app.models) and move to the device inside one.

Each call asks for the seconds its plan needs (`tuning_seconds`, `query_seconds`), capped by
PETSTUDIO_GPU_SECONDS: ZeroGPU refuses a call that asks for more than the visitor has left today.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gradio as gr
import torch

from app import views
from core.query import QueryError
from core.runs import USER_ERRORS
from core.trainer import pick_device

try:
    import spaces
except ImportError:
    spaces = None
# On ZeroGPU hardware (`spaces` reads the same variable); elsewhere spaces.GPU is a plain call.
ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true", "yes", "on")

GPU_SECONDS = int(os.environ.get("PETSTUDIO_GPU_SECONDS", "300"))   # the most one call asks for
START_SECONDS = 3.0   # a ZeroGPU worker's start (the fork, the arguments unpickled), asked for on top of a plan
OUT_OF_MEMORY = ("the GPU ran out of memory: use a smaller batch size, fewer frames per video or a smaller backbone "
                 "(the models kept between calls were let go)")


@dataclass(frozen=True)
class Call:
    """What a function running on the device is told: where it runs, and when its GPU grant ends
    (a time.monotonic() value; None where nothing is granted: no ZeroGPU)."""

    device: torch.device
    deadline: Optional[float] = None


def granted_seconds(seconds: float) -> int:
    """What a call planned to take `seconds` asks for: its plan and the worker's start, capped."""
    return max(1, min(GPU_SECONDS, math.ceil(seconds + START_SECONDS)))


def _duration(work: Callable, args: tuple, kwargs: dict, seconds: float) -> int:
    """ZeroGPU's duration callable: called with the entry's own arguments, before the call."""
    return granted_seconds(seconds)


def _enter(work: Callable, args: tuple, kwargs: dict, seconds: float) -> Any:
    # the grant's clock started before this worker did (the fork, the arguments)
    deadline = time.monotonic() + granted_seconds(seconds) - START_SECONDS if ZERO_GPU else None
    call = Call(pick_device(), deadline)
    try:
        return work(call, *args, **kwargs)
    except gr.Error:
        raise
    except torch.cuda.OutOfMemoryError as error:
        from app.models import MODELS

        MODELS.clear()
        torch.cuda.empty_cache()
        raise gr.Error(OUT_OF_MEMORY) from error
    except (QueryError, *USER_ERRORS) as error:   # only a gr.Error keeps its message out of a ZeroGPU worker
        raise views.user_error(error) from error


_gpu_entry = spaces.GPU(duration=_duration)(_enter) if spaces is not None else _enter


def on_device(work: Callable[..., Any], *args, seconds: float, **kwargs) -> Any:
    """`work(call, *args, **kwargs)` on the device, asking for `seconds` of GPU time (ZeroGPU).
    `work` must be a module-level function and its arguments plain data: on ZeroGPU they are pickled."""
    return _gpu_entry(work, args, kwargs, seconds)


# Before this process has timed a step: seconds per training step at batch 32 and per scored test
# item, by where the call runs and the backbone's family; loading a model, once per call.
STEP_SECONDS = {"cuda": {"offline": 0.02, "openclip": 0.25, "blip": 0.8},
                "cpu": {"offline": 0.08, "openclip": 3.0, "blip": 9.0}}
ITEM_SECONDS = {"cuda": {"offline": 0.002, "openclip": 0.01, "blip": 0.04},
                "cpu": {"offline": 0.01, "openclip": 0.15, "blip": 0.6}}
LOAD_SECONDS = {"offline": 2.0, "openclip": 10.0, "blip": 20.0}
MARGIN = 1.3
_measured: dict[tuple, float] = {}   # (spec, method, batch size) -> seconds per step, timed by this process


def family(spec: str) -> str:
    return spec.split(":", 1)[0] if ":" in spec else spec


def _table(table: dict, spec: str) -> float:
    kind = "cuda" if pick_device().type == "cuda" else "cpu"   # (spaces makes ZeroGPU's main process say cuda)
    return table[kind].get(family(spec), max(table[kind].values()))


def record_step_time(spec: str, method: str, batch_size: int, seconds_per_step: float) -> None:
    if math.isfinite(seconds_per_step) and seconds_per_step > 0:
        _measured[(spec, method, batch_size)] = seconds_per_step


def step_seconds(spec: str, method: str, batch_size: int) -> float:
    measured = _measured.get((spec, method, batch_size))
    return measured if measured is not None else _table(STEP_SECONDS, spec) * max(1.0, batch_size / 32)


def scoring_seconds(spec: str, test_items: int) -> float:
    return 2.0 + _table(ITEM_SECONDS, spec) * test_items


def tuning_seconds(spec: str, method: str, steps: int, batch_size: int, test_items: int, runs: int = 1,
                   scorings: int = 2) -> float:
    """A tuning's plan in seconds: load the model, score zero-shot, train, score after each epoch
    where asked, score tuned, save."""
    one = (LOAD_SECONDS.get(family(spec), 20.0) + scorings * scoring_seconds(spec, test_items)
           + steps * step_seconds(spec, method, batch_size))
    return MARGIN * one * runs


def query_seconds(spec: str, items: int) -> float:
    """A query over a gallery of `items` not yet embedded (0 when it is): load, embed, search."""
    return MARGIN * (LOAD_SECONDS.get(family(spec), 20.0) + scoring_seconds(spec, items))
