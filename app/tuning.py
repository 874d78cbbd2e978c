"""The tuning call as the app makes it: on a ZeroGPU Space inside `spaces.GPU` (a worker process
that receives pickled arguments), elsewhere in a thread of the app. Its progress and its cancel
request therefore travel through files in the run's live folder rather than through callbacks."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from core.result import RunResult
from core.runs import tune
from core.trainer import Progress

try:
    import spaces
except ImportError:
    spaces = None

# Seconds a ZeroGPU call may hold the GPU; a tuning run must finish within it.
GPU_SECONDS = int(os.environ.get("PETSTUDIO_GPU_SECONDS", "300"))
PROGRESS_FILE = "progress.jsonl"
CANCEL_FILE = "cancel"


def gpu_bound(function: Callable) -> Callable:
    """`spaces.GPU` where the `spaces` package is present (ZeroGPU), the function itself elsewhere."""
    if spaces is None:
        return function
    return spaces.GPU(duration=GPU_SECONDS)(function)


def cancelled(live: Path) -> bool:
    """Cancel was asked for, or the session (and its folder) is gone."""
    return (live / CANCEL_FILE).exists() or not live.exists()


def read_progress(live: Path) -> list[dict[str, Any]]:
    """Every training step reported so far: step, total_steps, epoch, loss, elapsed, eta."""
    try:
        lines = (live / PROGRESS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]   # the last line may be half written


@gpu_bound
def tune_on_device(live: str, **arguments) -> RunResult:
    """core.runs.tune, reporting each step to `live`/progress.jsonl and stopping when `live`/cancel appears."""
    folder = Path(live)
    with open(folder / PROGRESS_FILE, "a", encoding="utf-8") as log:
        def report(p: Progress) -> None:
            log.write(json.dumps({"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "loss": p.loss,
                                  "elapsed": p.elapsed, "eta": p.eta}) + "\n")
            log.flush()

        return tune(**arguments, progress=report, cancel=lambda: cancelled(folder))
