"""The one checkpoint format: a run folder with pet.safetensors (PET parameters only) and run.json."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.pet import PetError, PetHandle, make_config
from core.result import ResultError, RunResult, load_json
from core.trainer import PRECISIONS
from core.tasks import TASKS, TaskError, check_metrics, headline_metric

WEIGHTS = "pet.safetensors"
RUN_INFO = "run.json"
_PACKAGES = ("torch", "open_clip_torch", "transformers", "safetensors", "peft")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with a message meant for the user."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def partial(path: Path) -> Path:
    """Where `path` is written before it is complete: a hidden name beside it."""
    return path.with_name(f".{path.name}.partial")


def save(folder: str | Path, handle: PetHandle, result: RunResult) -> Path:
    """Write the handle's parameters and the run's result (method, config, backbone, metrics...) into `folder`.
    Each file is written under its `partial` name and then renamed, so a run killed while saving
    leaves no half-written checkpoint; non-finite parameters are refused (PetError)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = handle.state_dict()
    result.versions = package_versions()
    text = json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n"
    save_file(state, str(partial(folder / WEIGHTS)), metadata={"method": handle.method})
    partial(folder / RUN_INFO).write_text(text, encoding="utf-8")
    for name in (WEIGHTS, RUN_INFO):
        partial(folder / name).replace(folder / name)
    return folder


def read(path: str | Path) -> tuple[RunResult, Path]:
    """run.json, checked against its schema, and the weights file, from a run folder or its
    .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    weights = path / WEIGHTS if path.is_dir() else path
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights.name}: only .safetensors checkpoints are loaded")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such checkpoint file")
    info_file = weights.parent / RUN_INFO
    if not info_file.is_file():
        raise CheckpointError(f"{info_file}: missing; a checkpoint is a folder with {WEIGHTS} and {RUN_INFO}")
    try:
        info = load_json(info_file)
    except ValueError as error:
        raise CheckpointError(f"{info_file}: {error}") from error
    except OSError as error:
        raise CheckpointError(f"{info_file}: cannot be read ({error.strerror})") from error
    return check_result(info, str(info_file)), weights


def check_result(data: Any, where: str = RUN_INFO) -> RunResult:
    """A run.json's content as a RunResult: typed (core.result), its method known with options of
    their declared types and ranges, its task known; anything else is refused with the key named."""
    try:
        result = RunResult.from_json(data, where)
    except ResultError as error:
        raise CheckpointError(str(error)) from error
    if result.task not in TASKS:
        raise CheckpointError(f"{where}: 'task' must be one of {', '.join(TASKS)}")
    if result.train is not None and result.train.precision not in (None, *PRECISIONS):
        raise CheckpointError(f"{where}: 'train'['precision'] must be one of {', '.join(PRECISIONS)}")
    if result.scored:   # what its card, the comparison and its curves show must be there
        key = headline_metric(result.task)
        for name, metrics in (("tuned", result.tuned), ("zero_shot", result.zero_shot),
                              *((f"train.epoch_metrics[{i}]", m) for i, m in enumerate(result.train.epoch_metrics))):
            if key not in metrics:
                raise CheckpointError(f"{where}: '{name}' has no '{key}', the {result.task} task's headline metric")
            try:
                check_metrics(result.task, metrics)
            except TaskError as error:
                raise CheckpointError(f"{where}: '{name}': {error}") from error
        if set(result.zero_shot) != set(result.tuned):   # a card shows each tuned metric beside its zero-shot one
            raise CheckpointError(f"{where}: 'zero_shot' and 'tuned' must hold the same metrics")
        if result.backbone_params < 1:
            raise CheckpointError(f"{where}: 'backbone_params' must be at least 1")
    try:
        make_config(result.method, result.config)
    except PetError as error:
        raise CheckpointError(f"{where}: {error}") from error
    return result


def load_into(handle: PetHandle, weights: str | Path) -> None:
    """Load a weights file into an attached handle, checking every name, shape and dtype and
    that every value is finite; tensors the handle does not have are never read."""
    name = Path(weights).name
    try:
        with safe_open(str(weights), framework="pt") as opened:
            names = set(opened.keys())
            own = set(handle.trainable_parameters())
            if names != own:
                raise CheckpointError(f"{name}: {handle.method} weights do not match: "
                                      f"missing {sorted(own - names)[:5]}, "
                                      f"unexpected {sorted(names - own)[:5]}")
            state = {n: opened.get_tensor(n) for n in sorted(names)}
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{name}: not a readable safetensors file ({str(error)[:200]})") from error
    try:
        handle.load_state_dict(state)
    except ValueError as error:   # shapes, dtypes, non-finite values
        raise CheckpointError(f"{name}: {error}") from error
