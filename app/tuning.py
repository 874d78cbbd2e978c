"""The tuning call as the app makes it: on a ZeroGPU Space inside `spaces.GPU` (a worker process
that receives pickled arguments), elsewhere in a thread of the app. Its progress and its cancel
request therefore travel through files in the run's live folder rather than through callbacks."""
from __future__ import annotations

import contextvars
import json
import os
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from app.sessions import STORE
from core.result import RunResult
from core.runs import tune
from core.sweep import SweepProgress, SweepResult, sweep
from core.trainer import Progress

try:
    import spaces
except ImportError:
    spaces = None

# Seconds a ZeroGPU call may hold the GPU; a tuning run must finish within it.
GPU_SECONDS = int(os.environ.get("PETSTUDIO_GPU_SECONDS", "300"))
# A shared Space stays responsive: at most this many tunings (or comparisons) run at once, the rest wait.
TUNING_CONCURRENCY = int(os.environ.get("PETSTUDIO_TUNING_CONCURRENCY", "1"))
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


def claim_folders(session, kind: str, label: str) -> tuple[Path, Path, Path]:
    """(live folder, output folder, dataset root) for a tuning or comparison of the session, taken
    under its lock so that a dataset loaded meanwhile cannot remove the one being read; the
    session is marked as tuning (the caller clears it)."""
    with session.lock:
        if session.dataset is None:
            raise gr.Error("load a dataset first (Data tab)")
        if session.live is not None and not session.tuning:   # the previous progress is not shown again
            STORE.remove(session.live)
        session.live = live = session.new_folder("live", label)
        out = session.new_folder(kind, label)
        session.tuning = True
        return live, out, session.dataset.root


def run_polling(call: Callable, poll: Callable[[], None], *arguments, **keywords):
    """`call` in a worker thread — in a copy of this thread's context, which carries the Gradio
    request (ZeroGPU finds the visitor by it) — with `poll()` every half second until it ends."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(contextvars.copy_context().run, call, *arguments, **keywords)
        while not wait([job], timeout=0.5).done:
            poll()
        return job.result()


def request_cancel(session) -> str:
    """Ask the session's running tuning or comparison to stop after its current step."""
    if session.live is None or not session.tuning:
        return "nothing is tuning"
    (session.live / CANCEL_FILE).touch()
    session.live_status = "cancelling after the current step…"
    return session.live_status


def read_progress(live: Path) -> list[dict[str, Any]]:
    """Every training step reported so far: step, total_steps, epoch, loss, elapsed, eta."""
    try:
        lines = (live / PROGRESS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]   # the last line may be half written


def _step_line(p: Progress) -> dict[str, Any]:
    return {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "loss": p.loss, "elapsed": p.elapsed,
            "eta": p.eta}


@gpu_bound
def tune_on_device(live: str, **arguments) -> RunResult:
    """core.runs.tune, reporting each step to `live`/progress.jsonl and stopping when `live`/cancel appears."""
    folder = Path(live)
    with open(folder / PROGRESS_FILE, "a", encoding="utf-8") as log:
        def report(p: Progress) -> None:
            log.write(json.dumps(_step_line(p)) + "\n")
            log.flush()

        return tune(**arguments, progress=report, cancel=lambda: cancelled(folder))


@gpu_bound
def sweep_on_device(live: str, **arguments) -> SweepResult:
    """core.sweep.sweep, reporting each run and step to `live`/progress.jsonl (a step line also
    says which run of how many it belongs to) and stopping when `live`/cancel appears."""
    folder = Path(live)
    with open(folder / PROGRESS_FILE, "a", encoding="utf-8") as log:
        def report(p: SweepProgress) -> None:
            step = _step_line(p.step) if p.step else {"step": 0, "total_steps": 1, "epoch": 0, "loss": None,
                                                      "elapsed": 0.0, "eta": None}
            log.write(json.dumps({**step, "run": p.run, "runs": p.runs, "label": p.label, "seed": p.seed,
                                  "fraction": p.fraction}) + "\n")
            log.flush()

        return sweep(**arguments, progress=report, cancel=lambda: cancelled(folder))
