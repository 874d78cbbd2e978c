"""The tuning call as the app makes it: through the one device entry (app.device: on a ZeroGPU
Space a forked worker that receives pickled arguments), from a thread of the app that carries the
handler's context. Its progress and its cancel request therefore travel through files in the
run's live folder rather than through callbacks. A call stops training at its GPU grant's end,
less the time to score and save, so nothing a run learned is lost to the time limit."""
from __future__ import annotations

import contextvars
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import gradio as gr

from app.device import MARGIN, Call, scoring_seconds, tuning_seconds
from app.models import MODELS, ModelKey, refuse_stand_in
from app.sessions import STORE
from core import lr_range
from core.backbones import Backbone
from core.data import Dataset
from core.pet import get_method
from core.report import write_report
from core.result import RunResult
from core.runs import USER_ERRORS, suggested_lr, tune
from core.sweep import SweepProgress, SweepResult, sweep
from core.trainer import Progress
# A shared Space stays responsive: at most this many tunings (or comparisons) run at once, the rest wait.
TUNING_CONCURRENCY = int(os.environ.get("PETSTUDIO_TUNING_CONCURRENCY", "1"))
PROGRESS_FILE = "progress.jsonl"
CANCEL_FILE = "cancel"


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


def training_steps(live: Path) -> list[dict[str, Any]]:
    """The training steps reported so far as the run's own curve will hold them: a restart's
    reports replace those of the steps it trains again (a comparison's runs each keep theirs, and
    its lines that only announce a run are left out)."""
    steps: list[dict[str, Any]] = []
    for step in read_progress(live):
        if step["loss"] is None:
            continue
        while steps and steps[-1].get("run") == step.get("run") and steps[-1]["step"] >= step["step"]:
            steps.pop()
        steps.append(step)
    return steps


def _step_line(p: Progress) -> dict[str, Any]:
    return {"step": p.step, "total_steps": p.total_steps, "epoch": p.epoch, "loss": p.loss, "elapsed": p.elapsed,
            "eta": p.eta}


def planned_seconds(dataset: Dataset, spec: str, task: str, method: str, shots: Optional[int], epochs: int,
                    batch_size: int, runs: int = 1, epoch_metrics: bool = True) -> tuple[float, int]:
    """(seconds to ask the device for, training steps) of `runs` tunings of `dataset`, each scored
    zero-shot, tuned and, with `epoch_metrics`, after every epoch."""
    train = [item for item in dataset.split("train") if (item.qa if task == "vqa" else item.captions)]
    # the items with the most pairs: an estimate that errs long
    pairs = sorted((len(item.qa if task == "vqa" else item.captions) for item in train), reverse=True)[:shots or None]
    steps = math.ceil(sum(pairs) / max(1, batch_size)) * epochs
    # the range test that finds the learning rate (core.lr_range): each of its steps counted as a
    # training step and half (its smaller batch costs about half a step of 32 on the offline model:
    # the estimate errs long)
    range_test = math.ceil(1.5 * len(lr_range.plan(sum(pairs), epochs, batch_size, suggested_lr(spec, method))[0]))
    test_items = len(dataset.split("test"))
    return tuning_seconds(spec, method, steps + range_test, batch_size, test_items, runs,
                          scorings=2 + epochs * epoch_metrics), steps


def training_deadline(call: Call, model: str, test_items: int) -> Optional[float]:
    """When training must stop for the run to be scored and saved within the call's grant."""
    return call.deadline - MARGIN * 2 * scoring_seconds(model, test_items) if call.deadline is not None else None


def tune_on_device(call: Call, live: str, test_items: int, arguments: dict[str, Any]) -> RunResult:
    """core.runs.tune, reporting each step to `live`/progress.jsonl and stopping when `live`/cancel appears."""
    folder = Path(live)
    with open(folder / PROGRESS_FILE, "a", encoding="utf-8") as log:
        def report(p: Progress) -> None:
            log.write(json.dumps(_step_line(p)) + "\n")
            log.flush()

        return tune(**arguments, progress=report, cancel=lambda: cancelled(folder),
                    deadline=training_deadline(call, arguments["model"], test_items))


def sweep_on_device(call: Call, live: str, test_items: int, arguments: dict[str, Any]) -> SweepResult:
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

        return sweep(**arguments, progress=report, cancel=lambda: cancelled(folder),
                     deadline=training_deadline(call, arguments["model"], test_items))


def load_for_report(spec: str, seed: int, local_paths: bool, methods: Iterable[str]) -> None:
    """Before a report's device call: the shared backbone its gates are read on, when one of its
    methods has gates to show (the others need no model). One that cannot be loaded is left to the
    report, whose gates figure says why."""
    if any(get_method(method).figure is not None for method in methods):
        try:
            MODELS.backbone(spec, seed, local_paths)
        except USER_ERRORS:
            pass


def report_on_device(call: Call, source: str, out: str, local_paths: bool) -> str:
    """core.report.write_report, reading the runs' gates on the app's shared backbones (a report of a
    comparison would otherwise load its backbone once more for every method with gates)."""
    @contextmanager
    def shared(spec: str, seed: int) -> Iterator[Backbone]:
        with MODELS.on(call, ModelKey(spec, seed, local_paths)) as (backbone, _):
            refuse_stand_in(backbone, spec)
            yield backbone

    return str(write_report(source, out, local_paths=local_paths, backbones=shared))
