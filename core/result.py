"""A run's result, typed: what `tune` returns, what run.json holds (with a schema version), and
what the CLI, the app and the figures read. Reading one back checks every field against the
types declared here (a run.json is treated as hostile: see README, "Limits and safety")."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

SCHEMA_VERSION = 2      # 1: the same fields without "schema_version" (runs saved before it existed)
MAX_TEXT = 10_000       # characters of any text
MAX_LIST = 1_000_000    # entries of any list (the step losses of a long run)
MAX_SEED = 2**32 - 1
MAX_FRAMES = 64
MAX_JSON_BYTES = 32 * 2**20   # a run.json (MAX_LIST step losses, about 25 bytes each as written), a sweep.json, a cache entry
MAX_INT = 2**53               # any whole number: the largest a float (and a plot) holds exactly
LR_RANGE = (1e-8, 10.0)       # the learning rates a run may be given (a restart's are lower still)
BELOW_ZERO_SHOT = "ends below its own zero-shot score"   # said wherever such a run is shown
COLLAPSED = "collapsed the embeddings of its test media onto one another"   # said wherever such a run is shown
FLAGS = ((BELOW_ZERO_SHOT, "below_zero_shot"), (COLLAPSED, "collapsed"))   # each with its field (and --json key)
FLAGS_OF_RUNS = {BELOW_ZERO_SHOT: "end below their own zero-shot score",   # each said of several runs
                 COLLAPSED: "collapsed the embeddings of their test media onto one another"}
# A run collapsed when its test media sit closer than this share of the untuned model's spread
# (core.tasks.encoding.media_spread). On the offline world, VQA with Aurora at 1e-2 on the whole
# split (a rate 3× past its best) answered every question but colour's with one answer, at 0.16 and
# 0.19; of 106 saved VQA runs at 16 shots the ones below 0.25 were at or near zero-shot but two LoRA
# runs near LoRA's best (0.20, 0.24: flagged too, the spread alone does not tell them from the
# collapse), and no retrieval run fell below 0.65. At each method's best fixed rate (VQA, 16 shots,
# seed 0) it fired on 3 of 27: BitFit near zero-shot, and LoRA and Aurora on textures at their
# methods' level. A warning, then, that errs on the side of speaking.
COLLAPSED_SPREAD = 0.25


def ends_below_zero_shot(task: str, zero_shot: dict[str, float], tuned: dict[str, float]) -> bool:
    """Tuned lower than the untuned model on the task's headline metric: the run made it worse."""
    from core.tasks import headline_metric   # the task registry reads datasets; a result stays light

    key = headline_metric(task)
    return key in zero_shot and key in tuned and tuned[key] < zero_shot[key]


class ResultError(ValueError):
    """A run.json that is not a PET Studio run result; the message names the key."""


Metrics = dict[str, float]


@dataclass
class DatasetSummary:
    fingerprint: str
    manifest: str
    items: int
    captions: int
    questions: int
    train: int
    test: int
    train_used: int


@dataclass
class Restart:
    """A divergence the training caught: at `lr` it went wrong at `step`, and it restarted at
    `restarted_at` from the weights at the end of epoch `from_epoch` (0: the untrained weights);
    `restarted_at` None: a cancel or the deadline had stopped the run, which ends at those weights."""

    lr: float
    step: int
    reason: str
    restarted_at: Optional[float]
    from_epoch: int = 0


@dataclass
class MediaSpread:
    """How far apart the test split's media sit in the embedding space, untuned and tuned: the mean
    of 1 − cosine over their pairs (core.tasks.encoding.media_spread)."""

    zero_shot: float
    tuned: float

    @property
    def collapsed(self) -> bool:
        return self.tuned < COLLAPSED_SPREAD * self.zero_shot

    def check(self, where: str) -> None:
        if not all(math.isfinite(v) and 0 <= v <= 2 for v in (self.zero_shot, self.tuned)):
            raise ResultError(f"{where}: a media spread is a number from 0 to 2")


@dataclass
class LrChoice:
    """How `--lr auto` chose the learning rate (core.lr_range), with the range test's curve: the
    learning rate of each step taken and the loss on the test's batch after it (empty when no test ran)."""

    lr: float
    why: str
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    batch_size: int = 0
    seconds: float = 0.0
    share: float = 0.0         # the test's items over the run's training items (epochs × items)
    reused: bool = False       # read from the cache: this run spent nothing on it
    finished: bool = True      # False: a cancel or a deadline stopped it (never cached)

    def check(self, where: str) -> None:
        """Raise ResultError unless the rates are ones a run may be given, the curve's two lists
        match and `steps` counts them."""
        low, high = LR_RANGE
        if not (low <= self.lr <= high and all(0 < lr <= high for lr in self.lrs) and
                len(self.lrs) == len(self.losses) == self.steps):
            raise ResultError(f"{where}: a learning-rate choice needs a rate from {low:g} to {high:g}, a curve of "
                              f"positive rates up to {high:g}, and as many losses as rates as it has steps")


@dataclass
class TrainSummary:
    epochs: int
    lr: float
    batch_size: int
    shots: Optional[int]
    bf16: bool
    device: str
    epoch_losses: list[float]
    step_losses: list[float]
    epoch_metrics: list[Metrics]
    cancelled: bool
    warmup: float = 0.1           # runs saved before recipes trained with these
    precision: Optional[str] = None   # asked for (auto, fp32, bf16, fp16; None: before it could be)
    autocast: Optional[str] = None    # what ran: bf16, fp16 or fp32 (None: saved before fp16; `bf16` says)
    out_of_time: bool = False         # stopped at a GPU grant's deadline (the note says after how many steps)
    seconds: Optional[float] = None   # the training loop's own time, restarted attempts' too (None: saved before it was kept)
    steps_run: int = 0                # the steps `seconds` covers, restarted attempts' too (0: saved before it was kept)
    restarts: list[Restart] = field(default_factory=list)   # divergences caught; `lr` is the one that finished
    weight_decay: float = 0.05
    lr_choice: Optional[LrChoice] = None   # how --lr auto chose `lr` (None: a rate given, or a studio run that trained nothing)
    lr_given: Optional[bool] = None        # a number was given for the rate (None: saved before it was kept)

    @property
    def started_at(self) -> float:
        """The rate the run started at: a restart's lower one is the guard's."""
        return self.restarts[0].lr if self.restarts else self.lr

    def check(self, where: str) -> None:
        """Raise ResultError unless its rates are ones a run trains at (0 for a method with nothing to
        train: zero-shot's): each restart's below the one it restarted from, from an epoch the run
        had; the chosen rate the one it started at."""
        high = LR_RANGE[1]
        if not self.lr <= high:
            raise ResultError(f"{where}['lr'] must be at most {high:g}")
        for number, restart in enumerate(self.restarts):
            # each restart at the rate the one before restarted at; the run finishes at the last one's
            follows = self.restarts[number + 1].lr if number + 1 < len(self.restarts) else self.lr
            if not (0 < restart.lr <= high and restart.from_epoch <= self.epochs and math.isclose(
                    follows, restart.lr if restart.restarted_at is None else restart.restarted_at, rel_tol=1e-6)
                    and (restart.restarted_at is None or restart.restarted_at < restart.lr)):
                raise ResultError(f"{where}['restarts'][{number}]: a restart goes from a rate above 0 and at most "
                                  f"{high:g} to a lower one, the rate the run goes on at, from an epoch the run had")
        if self.lr_choice is not None:
            self.lr_choice.check(f"{where}['lr_choice']")
            if not math.isclose(self.lr_choice.lr, self.started_at, rel_tol=1e-6):
                raise ResultError(f"{where}['lr_choice']['lr'] {self.lr_choice.lr:g} is not the rate the run "
                                  f"started at, {self.started_at:g}")


@dataclass
class Recipe:
    """What a recipe (core.pet.recipes) set for a run: method options, and training settings
    (None: the studio's); `source` says whose settings they are."""

    name: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None
    warmup: Optional[float] = None


@dataclass
class RunResult:
    """A run: always its method, options and backbone; once scored (`tuned` is not None), the
    budget, the data, the training and the metrics before and after."""

    method: str
    config: dict[str, Any]
    backbone: str
    method_revision: int = 1    # the method's revision (core.pet.registry.Method) that tuned it
    recipe: Optional[Recipe] = None    # None: saved before recipes, the studio's defaults
    seed: int = 0
    task: str = "retrieval"
    extra_answers: list[str] = field(default_factory=list)
    frames: int = 8
    note: Optional[str] = None
    backbone_weights: str = ""
    backbone_params: int = 0
    trainable_params: int = 0
    trainable_pct: float = 0.0
    groups: dict[str, int] = field(default_factory=dict)
    dataset: Optional[DatasetSummary] = None
    train: Optional[TrainSummary] = None
    zero_shot: Optional[Metrics] = None
    tuned: Optional[Metrics] = None
    media_spread: Optional[MediaSpread] = None   # None: saved before it was measured, or not finite
    seconds: float = 0.0
    out: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def scored(self) -> bool:
        return self.tuned is not None

    @property
    def below_zero_shot(self) -> bool:
        """Tuned lower than the untuned model on the task's headline metric: the run made it worse."""
        return self.scored and ends_below_zero_shot(self.task, self.zero_shot or {}, self.tuned)

    @property
    def collapsed(self) -> bool:
        """Tuning drew the test media's embeddings together to under COLLAPSED_SPREAD of the untuned
        model's spread: a warning that its score may hide a partial collapse (not a verdict: some
        sound runs end this close too)."""
        return self.scored and self.media_spread is not None and self.media_spread.collapsed

    @property
    def flags(self) -> list[str]:
        """What must be said wherever the run's result is shown (BELOW_ZERO_SHOT, COLLAPSED)."""
        return [flag for flag, field in FLAGS if getattr(self, field)]

    @property
    def unsaid_warning(self) -> Optional[str]:
        """The flags the note does not say (a run.json written before it did), for whatever shows the note."""
        unsaid = [flag for flag in self.flags if flag not in (self.note or "")]
        return f"This run {' and '.join(unsaid)}." if unsaid else None

    @property
    def flag_values(self) -> dict[str, bool]:
        """Each flag's field (and --json key) with whether the run raised it."""
        return {field: getattr(self, field) for _, field in FLAGS}

    @property
    def note_label(self) -> str:
        """What precedes the note wherever it is shown: a ⚠ when the note says a flag."""
        return "⚠ Note:" if any(flag in (self.note or "") for flag in self.flags) else "Note:"

    def to_json(self) -> dict[str, Any]:
        """run.json's content: the fields, and each flag (read back from the scores, not from here)."""
        return {**dataclasses.asdict(self), **self.flag_values}

    @classmethod
    def from_json(cls, data: Any, where: str = "run.json") -> "RunResult":
        """Read a run.json's content, refusing wrong types, missing keys and out-of-range values."""
        if not isinstance(data, dict):
            raise ResultError(f"{where}: must be a JSON object, not {type(data).__name__}")
        version = data.get("schema_version", 1)
        if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
            raise ResultError(f"{where}: 'schema_version' {str(version)[:20]} is not one this PET Studio reads "
                              f"(1 to {SCHEMA_VERSION})")
        result = _read(cls, {**data, "schema_version": SCHEMA_VERSION}, where, nested=False)
        if result.scored and (result.dataset is None or result.train is None or result.zero_shot is None):
            missing = next(k for k in ("dataset", "train", "zero_shot") if getattr(result, k) is None)
            raise ResultError(f"{where}: a scored run (one with 'tuned') has no '{missing}'")
        if not result.seed <= MAX_SEED:
            raise ResultError(f"{where}: 'seed' must be between 0 and {MAX_SEED}")
        if not 1 <= result.frames <= MAX_FRAMES:
            raise ResultError(f"{where}: 'frames' must be between 1 and {MAX_FRAMES}")
        if result.media_spread is not None:
            result.media_spread.check(f"{where}: 'media_spread'")
        if result.train is not None:
            result.train.check(f"{where}: 'train'")
        return result


def load_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file's content, read as hostile: a regular file (a pipe would block, a device never
    end) of at most `limit` bytes of UTF-8, strict JSON (no NaN or Infinity), not nested past the
    parser's depth. Else a ValueError whose message says which ("not valid JSON (...)"), or an
    OSError when it cannot be opened."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        regular = stat.S_ISREG(os.fstat(descriptor).st_mode)
    except OSError:
        os.close(descriptor)
        raise
    if not regular:   # a folder opens too
        os.close(descriptor)
        raise ValueError("not a regular file")
    with os.fdopen(descriptor, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"not valid JSON ({str(error)[:200]})") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def read_record(kind: type, data: Any, where: str):
    """One of this module's records (e.g. an LrChoice kept in a cache) read back with its types checked."""
    return _value(data, kind, where)


def _read(kind: type, data: dict[str, Any], where: str, nested: bool = True):
    """A dataclass of `kind` from a JSON object: its required fields present, every field of its
    type (keys it does not declare are left out)."""
    hints = typing.get_type_hints(kind)
    values = {}
    for f in dataclasses.fields(kind):
        if f.name in data:
            values[f.name] = _value(data[f.name], hints[f.name],
                                    f"{where}['{f.name}']" if nested else f"{where}: '{f.name}'")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ResultError(f"{where}{'' if nested else ':'} has no '{f.name}'")
    return kind(**values)


_NAMES = {str: "a text", int: "a whole number", float: "a number", bool: "true or false"}


def _value(value: Any, hint: Any, where: str) -> Any:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:                       # Optional[X]
        return None if value is None else _value(value, arguments[0], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ResultError(f"{where} must be a JSON object")
        return _read(hint, value, where)
    if origin is list:
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise ResultError(f"{where} must be a list (of at most {MAX_LIST} entries)")
        return [_value(item, arguments[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:                              # a fixed number of entries, e.g. (mean, std)
        if not isinstance(value, list) or len(value) != len(arguments):
            raise ResultError(f"{where} must be a list of {len(arguments)} entries")
        return tuple(_value(item, kind, f"{where}[{i}]") for i, (item, kind) in enumerate(zip(value, arguments)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ResultError(f"{where} must be a JSON object")
        if arguments[1] is Any:     # a method's options: checked by the method itself
            return value
        return {key: _value(item, arguments[1], f"{where}['{key[:40]}']") for key, item in value.items()}
    if hint in (int, float) and type(value) is int and abs(value) > MAX_INT:   # no count or score we write
        raise ResultError(f"{where} must be at most {MAX_INT}")
    if hint is float and type(value) is int:
        value = float(value)
    if type(value) is not hint:
        raise ResultError(f"{where} must be {_NAMES[hint]}, not {repr(value)[:60]}")
    if hint is float and not math.isfinite(value):
        raise ResultError(f"{where} must be a finite number, not {value}")
    if hint in (int, float) and value < 0:   # counts, rates, losses, times, scores: none is negative
        raise ResultError(f"{where} must not be negative")
    if hint is str and len(value) > MAX_TEXT:
        raise ResultError(f"{where} is longer than {MAX_TEXT} characters")
    return value
