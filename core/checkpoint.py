"""The one checkpoint format: a run folder with pet.safetensors (PET parameters only) and run.json."""
from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.pet import PetError, PetHandle, make_config
from core.tasks import TASKS

WEIGHTS = "pet.safetensors"
RUN_INFO = "run.json"
MAX_INFO_BYTES = 16 * 2**20
MAX_TEXT = 10_000            # characters of any text in run.json
MAX_LIST = 1_000_000         # entries of any list (step losses of a long run)
MAX_SEED = 2**32 - 1
MAX_FRAMES = 64

# run.json as PET Studio reads it back. A type, a tuple of allowed types, [item] for a list,
# {"*": value} for a mapping of any names, or {key: value} for a mapping with exactly those keys.
_INFO_SCHEMA: dict[str, Any] = {
    "method": str, "config": dict, "backbone": str,
    "seed": int, "task": str, "extra_answers": [str], "frames": int, "note": (str, type(None)),
    "backbone_weights": str, "backbone_params": int, "trainable_params": int, "trainable_pct": float,
    "groups": {"*": int},
    "dataset": {"fingerprint": str, "manifest": str, "items": int, "captions": int, "questions": int, "train": int,
                "test": int, "train_used": int},
    "train": {"epochs": int, "lr": float, "batch_size": int, "shots": (int, type(None)), "bf16": bool, "device": str,
              "epoch_losses": [float], "step_losses": [float], "epoch_metrics": [{"*": float}], "cancelled": bool},
    "zero_shot": {"*": float}, "tuned": {"*": float}, "seconds": float, "out": str, "versions": {"*": str},
}
REQUIRED = ("method", "config", "backbone")
# A scored run (one with "tuned") has everything its card and the comparison show.
SCORED = ("task", "backbone_params", "trainable_params", "trainable_pct", "groups", "dataset", "train", "zero_shot",
          "tuned", "seconds")
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


def save(folder: str | Path, handle: PetHandle, info: dict[str, Any]) -> Path:
    """Write the handle's parameters and `info` (method, config, backbone, metrics...) into `folder`.
    Each file is written under its `partial` name and then renamed, so a run killed while saving
    leaves no half-written checkpoint; non-finite parameters are refused (PetError)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = handle.state_dict()
    info = {**info, "versions": package_versions()}
    text = json.dumps(info, indent=2, allow_nan=False) + "\n"
    save_file(state, str(partial(folder / WEIGHTS)), metadata={"method": handle.method})
    partial(folder / RUN_INFO).write_text(text, encoding="utf-8")
    for name in (WEIGHTS, RUN_INFO):
        partial(folder / name).replace(folder / name)
    return folder


def read(path: str | Path) -> tuple[dict[str, Any], Path]:
    """run.json's content, checked against its schema, and the weights file, from a run folder
    or its .safetensors file."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights.name}: only .safetensors checkpoints are loaded")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such checkpoint file")
    info_file = weights.parent / RUN_INFO
    if not info_file.is_file():
        raise CheckpointError(f"{info_file}: missing; a checkpoint is a folder with {WEIGHTS} and {RUN_INFO}")
    if info_file.stat().st_size > MAX_INFO_BYTES:
        raise CheckpointError(f"{info_file}: larger than {MAX_INFO_BYTES} bytes")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{info_file}: not valid JSON ({str(error)[:200]})") from error
    check_info(info, str(info_file))
    return info, weights


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def check_info(info: Any, where: str = RUN_INFO) -> None:
    """Refuse a run.json that is not PET Studio's: wrong types, missing keys, values out of range."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: must be a JSON object, not {type(info).__name__}")
    for key in REQUIRED + (SCORED if "tuned" in info else ()):
        if key not in info:
            raise CheckpointError(f"{where}: has no '{key}'")
    for key, value in info.items():
        if key in _INFO_SCHEMA:
            _check_value(value, _INFO_SCHEMA[key], f"{where}: '{key}'")
    if "task" in info and info["task"] not in TASKS:
        raise CheckpointError(f"{where}: 'task' must be one of {', '.join(TASKS)}")
    if not 0 <= info.get("seed", 0) <= MAX_SEED:
        raise CheckpointError(f"{where}: 'seed' must be between 0 and {MAX_SEED}")
    if not 1 <= info.get("frames", 1) <= MAX_FRAMES:
        raise CheckpointError(f"{where}: 'frames' must be between 1 and {MAX_FRAMES}")
    try:
        make_config(info["method"], info["config"])
    except PetError as error:
        raise CheckpointError(f"{where}: {error}") from error


def _check_value(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, list):
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise CheckpointError(f"{where} must be a list (of at most {MAX_LIST} entries)")
        for i, item in enumerate(value):
            _check_value(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise CheckpointError(f"{where} must be a JSON object")
        if "*" not in schema:
            missing = [k for k in schema if k not in value]
            if missing:
                raise CheckpointError(f"{where} has no '{missing[0]}'")
        for key, item in value.items():
            if "*" in schema or key in schema:
                _check_value(item, schema.get("*", schema.get(key)), f"{where}['{key[:40]}']")
    else:
        allowed = schema if isinstance(schema, tuple) else (schema,)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not any(type(value) is kind for kind in allowed):
            names = " or ".join({"str": "a text", "int": "a whole number", "float": "a number", "bool": "true or false",
                                 "NoneType": "null", "dict": "a JSON object"}[k.__name__] for k in allowed)
            raise CheckpointError(f"{where} must be {names}, not {json.dumps(value)[:60]}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{where} must be a finite number, not {value}")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise CheckpointError(f"{where} is longer than {MAX_TEXT} characters")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise CheckpointError(f"{where} must not be negative")


def load_into(handle: PetHandle, weights: str | Path) -> None:
    """Load a weights file into an attached handle, checking every name, shape and dtype and
    that every value is finite; tensors the handle does not have are never read."""
    name = Path(weights).name
    try:
        with safe_open(str(weights), framework="pt") as opened:
            names = set(opened.keys())
            own = set(handle.trainable_parameters())
            if names != own:
                raise CheckpointError(f"{name}: {handle.method} weights do not match: missing {sorted(own - names)[:5]}, "
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
