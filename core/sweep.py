"""A sweep: several methods (each with its options) × several seeds on one dataset and backbone,
run one after another in one job with zero-shot scored once; per method, the trainable budget,
every metric's mean ± standard deviation over the seeds, the time per run and the saved file
size. The CLI's `sweep`, the app's "Compare methods" and the report all read its sweep.json."""
from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable, MutableMapping, Optional

from core import checkpoint
from core.data import DEFAULT_LIMITS, read_dataset
from core.data.media import DEFAULT_FRAMES
from core.distributed import is_main_process
from core.pet import get_method, make_config
from core.result import FLAGS, FLAGS_OF_RUNS, MAX_SEED, RunResult, load_json, read_record
from core.backbones import WeightsBudget, load_backbone
from core.pet.recipes import check_recipe
from core.runs import RunError, check_settings, tune
from core.tasks import TASKS, check_metrics
from core.trainer import Progress, TrainingDiverged

SWEEP_INFO = "sweep.json"


@dataclass
class MethodChoice:
    """One method of a sweep with its options, e.g. `vlpet:granularity=middleX`."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method} ({settings})" if settings else self.method


def _top_level(text: str, separator: str) -> list[str]:
    """`text` split at `separator`s outside brackets and quotes (a list option holds commas)."""
    parts, depth, quoted, current = [], 0, False, ""
    for character in text:
        if character == '"':
            quoted = not quoted
        elif not quoted and character == "[":
            depth += 1
        elif not quoted and character == "]":
            depth -= 1
        if character == separator and depth == 0 and not quoted:
            parts.append(current)
            current = ""
        else:
            current += character
    return [p.strip() for p in [*parts, current] if p.strip()]


def parse_methods(text: str) -> list[MethodChoice]:
    """`aurora,vlpet:granularity=middleX;reduction=4,lora:towers=["vision","text"]` -> the choices,
    each checked against the method's declared options (values are read as JSON where they can be;
    a bare name given to a list option is a list of that one name)."""
    choices = []
    for part in _top_level(text, ","):
        method, _, settings = (p.strip() for p in part.partition(":"))
        kinds = {spec["name"]: spec["type"] for spec in get_method(method).options()}
        options = {}
        for setting in _top_level(settings, ";"):
            key, equals, value = (p.strip() for p in setting.partition("="))
            if not equals:
                raise RunError(f"'{setting}' in '{part}': write options as name=value")
            try:
                options[key] = json.loads(value)
            except ValueError:
                options[key] = value
            if kinds.get(key) == "names" and isinstance(options[key], str):
                options[key] = [options[key]]
        choices.append(MethodChoice(method, options))
    check_choices(choices)   # unknown options and values out of range are refused here
    return choices


@dataclass
class SweepProgress:
    run: int                   # 0-based index of the current run
    runs: int
    label: str
    seed: int
    step: Optional[Progress]   # the current run's step (None before its training starts)

    @property
    def fraction(self) -> float:
        done = self.step.step / self.step.total_steps if self.step else 0.0
        return (self.run + done) / self.runs


@dataclass
class MethodSummary:
    label: str
    method: str
    options: dict[str, Any]
    trainable_params: int
    trainable_pct: float
    runs: list[str]                          # run folders, one per seed that ended with a result
    metrics: dict[str, tuple[float, float]]  # key -> (mean, std over seeds)
    zero_shot: dict[str, float]              # mean over seeds (they differ only for an untrained backbone)
    seconds: float                           # mean time per run
    file_bytes: int                          # saved pet.safetensors
    below_zero_shot: int = 0                 # runs that ended below their own zero-shot score
    collapsed: int = 0                       # runs that collapsed their test media's embeddings
    restarted: int = 0                       # runs the divergence guard restarted at a lower lr
    diverged: list[str] = field(default_factory=list)   # the message of each run that diverged past its restarts

    @property
    def warning(self) -> Optional[str]:
        """What the table must say beside the method's numbers, if anything."""
        ran = len(self.runs) + len(self.diverged)
        said = [*(f"{count} of {ran} runs {flag if count == 1 else FLAGS_OF_RUNS[flag]}"
                  if (count := getattr(self, field)) else "" for flag, field in FLAGS),
                f"{self.restarted} of {ran} runs diverged and restarted" if self.restarted else "",
                f"{len(self.diverged)} of {ran} runs diverged after every restart and have no result "
                f"(the means are of the others): {self.diverged[0]}" if self.diverged else ""]
        return "; ".join(filter(None, said)) or None


@dataclass
class SweepResult:
    model: str
    fingerprint: str
    task: str
    shots: Optional[int]
    epochs: int
    seeds: list[int]
    methods: list[MethodSummary]
    cancelled: bool                # stopped early: the methods hold the runs that finished
    seconds: float
    out: str
    command: str                   # the command that reproduces it (the data named by its fingerprint)
    note: Optional[str] = None     # another backbone used, the GPU time run out, a method left with no result
    recipe: str = "studio"         # core.pet.recipes: whose settings every run started from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(choice: MethodChoice, results: list[RunResult], diverged: Optional[list[str]] = None) -> MethodSummary:
    first = results[0]
    keys = list(first.tuned)
    folder = Path(first.out)
    return MethodSummary(
        label=choice.label, method=choice.method, options=dict(choice.options),
        trainable_params=first.trainable_params, trainable_pct=first.trainable_pct, runs=[r.out for r in results],
        metrics={k: _mean_std([r.tuned[k] for r in results]) for k in keys},
        zero_shot={k: statistics.fmean(r.zero_shot[k] for r in results) for k in keys},
        seconds=statistics.fmean(r.seconds for r in results),
        # Only the first of several processes writes the runs: the others may not see them yet.
        file_bytes=(folder / checkpoint.WEIGHTS).stat().st_size if (folder / checkpoint.WEIGHTS).is_file() else 0,
        **{field: sum(getattr(r, field) for r in results) for _, field in FLAGS},   # how many runs raised each flag
        # a divergence found as a stop ended the run (restarted_at None): it did not restart
        restarted=sum(any(r.restarted_at is not None for r in run.train.restarts) for run in results),
        diverged=list(diverged or []))


def sweep_command(model: str, choices: list[MethodChoice], seeds: list[int], shots: Optional[int], epochs: int,
                  lr: float | str, batch_size: int, task: str, frames: int, precision: str,
                  recipe: str = "studio") -> str:
    methods = ",".join(c.method + (":" + ";".join(f"{k}={json.dumps(v)}" for k, v in c.options.items())
                                   if c.options else "") for c in choices)
    parts = ["python -m core sweep", f"--model {model}", "--data DATA", f"--methods '{methods}'",
             f"--seeds {','.join(map(str, seeds))}", f"--epochs {epochs}", f"--batch-size {batch_size}",
             f"--task {task}", f"--frames {frames}", f"--shots {shots or 0}"]
    parts += [f"--lr {lr:g}"] if lr != "auto" else []
    parts += [f"--precision {precision}"] if precision != "auto" else []
    parts += [f"--recipe {recipe}"] if recipe != "studio" else []
    return " ".join(parts)


def check_choices(choices: list[MethodChoice]) -> None:
    """Refuse (RunError, PetError) a sweep's methods unless each is known with its options of their
    types and ranges, and no two would share run folders."""
    if not choices:
        raise RunError("name at least one method to sweep")
    for choice in choices:
        make_config(choice.method, choice.options)
    named = [_folder_name(choice, 0) for choice in choices]
    if len(set(named)) != len(named):   # their runs would share folders
        raise RunError(f"{next(c.label for c, n in zip(choices, named) if named.count(n) > 1)} is named twice: "
                       f"name each method (with its options) once")


def _folder_name(choice: MethodChoice, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", choice.label).strip("-") + f"-seed{seed}"


def sweep(model: str, data: str | Path, choices: list[MethodChoice], seeds: list[int], out: str | Path,
          shots: Optional[int] = 16, epochs: int = 10, lr: float | str = "auto", batch_size: int = 16,
          task: str = "retrieval", frames: int = DEFAULT_FRAMES, precision: str = "auto",
          progress: Optional[Callable[[SweepProgress], None]] = None, cancel: Optional[Callable[[], bool]] = None,
          local_paths: bool = True, recipe: str = "studio",
          zero_shot_cache: Optional[MutableMapping[tuple, dict]] = None,
          deadline: Optional[float] = None, lr_cache: Optional[MutableMapping[tuple, Any]] = None,
          budget: Optional[WeightsBudget] = None) -> SweepResult:
    """Tune every choice with every seed, each from `recipe` (core.pet.recipes; the learning rate of
    each run is `lr` as given, or with "auto" the recipe's or its range test's, core.runs.tune); a cancel stops
    after the current step, and the sweep keeps the runs that finished (the interrupted one stays
    on disk, marked cancelled, outside the means). At `deadline` (core.runs.tune) the run in hand
    stops, is kept the same way, and no further run starts. Each load keeps to `budget` (core.runs.tune)."""
    started = time.perf_counter()
    check_recipe(recipe)
    out = Path(out)
    if not seeds or len(set(seeds)) != len(seeds):
        raise RunError("give one or more different seeds")
    check_choices(choices)
    for seed in seeds:   # every run's settings, before the sweep's folder is made
        check_settings(shots=shots, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, frames=frames)
    try:   # under torchrun / accelerate only the first process writes (core.runs.tune does the same)
        if is_main_process() and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RunError(f"{out}: the sweep folder already exists and is not empty; choose another --out")
        if is_main_process():
            out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:   # a name the file system refuses
        if isinstance(error, RunError):
            raise
        raise RunError(f"{str(out)[:200]}: cannot be used as a sweep folder ({error})") from error
    # Resolved once, so that a fallback to the offline model shows, and its learning rates are the offline ones.
    backbone = load_backbone(model, seeds[0], fallback_offline=True, local_paths=local_paths, budget=budget)
    model, note = backbone.spec, backbone.fallback_note
    del backbone
    plan = [(number, seed) for number in range(len(choices)) for seed in seeds]
    finished: dict[int, list[RunResult]] = {}   # choice number -> its finished runs
    diverged: dict[int, list[str]] = {}          # choice number -> the messages of its runs that had no result
    zero_shot_cache = zero_shot_cache if zero_shot_cache is not None else {}   # scored once per sweep at least
    cancelled, fingerprint = False, ""
    for index, (number, seed) in enumerate(plan):
        choice = choices[number]
        if cancel is not None and cancel():
            cancelled = True
            break
        longest = max((r.seconds for runs in finished.values() for r in runs), default=0.0)
        if deadline is not None and time.monotonic() + longest > deadline:   # the next run would not fit
            cancelled = True
            note = "; ".join(filter(None, [note, f"the GPU time ran out before run {index + 1} of {len(plan)}"]))
            break
        report = (lambda step, i=index, c=choice, s=seed: progress(SweepProgress(i, len(plan), c.label, s, step))) \
            if progress else None
        if report:
            report(None)
        try:
            result = tune(model, data, choice.method, choice.options, shots=shots, epochs=epochs,
                          lr=lr, batch_size=batch_size, seed=seed, out=out / _folder_name(choice, seed),
                          precision=precision,
                          task=task, frames=frames, progress=report, cancel=cancel, local_paths=local_paths,
                          zero_shot_cache=zero_shot_cache, recipe=recipe, deadline=deadline, lr_cache=lr_cache,
                          budget=budget)
        except TrainingDiverged as error:   # one run's end, not the sweep's: the others are still worth having
            diverged.setdefault(number, []).append(f"seed {seed}: {error}")
            continue
        fingerprint = result.dataset.fingerprint
        if result.train.cancelled or result.train.out_of_time:
            cancelled = True
            if result.train.out_of_time:
                note = "; ".join(filter(None, [note, f"the GPU time ran out during run {index + 1} of {len(plan)}"]))
            break
        finished.setdefault(number, []).append(result)
    # A method none of whose runs ended with a result has no numbers to show: the note names it.
    lost = [f"{choices[number].label}: every run diverged after its restarts ({messages[0]})"
            for number, messages in diverged.items() if number not in finished]
    note = "; ".join(filter(None, [note, *lost])) or None
    if not finished and diverged and is_main_process():   # no run ended with a result: the data is still named
        with tempfile.TemporaryDirectory(dir=out, prefix="data-") as workdir:
            fingerprint = read_dataset(data, workdir, DEFAULT_LIMITS).fingerprint
    summary = SweepResult(
        model=model, fingerprint=fingerprint, task=task, shots=shots, epochs=epochs, seeds=list(seeds),
        methods=[summarise(choices[number], results, diverged.get(number)) for number, results in finished.items()],
        cancelled=cancelled,
        seconds=time.perf_counter() - started, out=str(out), note=note, recipe=recipe,
        command=sweep_command(model, choices, seeds, shots, epochs, lr, batch_size, task, frames, precision,
                                      recipe))
    if is_main_process():
        (out / SWEEP_INFO).write_text(json.dumps(summary.to_json(), indent=2, allow_nan=False) + "\n",
                                      encoding="utf-8")
    return summary


def read_sweep(folder: str | Path) -> SweepResult:
    """A sweep folder's sweep.json, read as hostile (core.result): every field of its type, its
    task known, its numbers ones a sweep writes, each method's options its own. Each of a method's
    runs is the folder of that name inside `folder` (sweep.json names them as the sweep was started,
    perhaps from another working folder), and `out` is `folder`: nothing outside it is read."""
    folder = Path(folder)
    path = folder / SWEEP_INFO
    try:
        result = read_record(SweepResult, load_json(path), SWEEP_INFO)
        _check_sweep(result)
    except (OSError, ValueError) as error:   # ResultError, RunError, TaskError, PetError
        raise RunError(f"{path}: not a sweep written by PET Studio ({str(error)[:300]})") from error
    inside = folder.resolve()
    for summary in result.methods:
        summary.runs = [str(folder / PurePath(run).name) for run in summary.runs]
        for run in map(Path, summary.runs):
            if not _own_run(run, inside / run.name):
                raise RunError(f"{path}: its run folder {run.name} is missing from {folder}, or leads outside it")
    result.out = str(folder)
    return result


def _own_run(run: Path, own: Path) -> bool:
    """Whether `run` is a folder that is `own` itself, its run.json and weights too: a link would lead outside."""
    try:
        return run.is_dir() and run.resolve() == own and all(
            (run / name).resolve() == own / name for name in (checkpoint.RUN_INFO, checkpoint.WEIGHTS))
    except (OSError, RuntimeError):   # a link loop (RuntimeError before Python 3.13)
        return False


def _check_sweep(result: SweepResult) -> None:
    """Raise a ValueError naming the key unless the sweep's names and numbers are ones a sweep writes."""
    check_recipe(result.recipe)
    if result.task not in TASKS:
        raise RunError(f"'task' must be one of {', '.join(TASKS)}")
    keys = set(TASKS[result.task].metrics)
    if not result.seeds or not all(seed <= MAX_SEED for seed in result.seeds):
        raise RunError(f"'seeds' must be one or more whole numbers up to {MAX_SEED}")
    for number, summary in enumerate(result.methods):
        where = f"'methods'[{number}]"
        make_config(summary.method, summary.options)   # a known method, options of their types and ranges
        if not summary.runs or not all(PurePath(run).name not in ("", ".", "..") for run in summary.runs):
            raise RunError(f"{where}['runs'] must name one or more run folders")
        if set(summary.metrics) != keys or set(summary.zero_shot) != keys:
            raise RunError(f"{where}: its metrics must be the {result.task} task's, {', '.join(sorted(keys))}")
        check_metrics(result.task, {k: mean for k, (mean, _) in summary.metrics.items()})
        check_metrics(result.task, summary.zero_shot)
        if max(summary.below_zero_shot, summary.collapsed, summary.restarted) > len(summary.runs):
            raise RunError(f"{where}: more runs flagged or restarted than it has runs")
