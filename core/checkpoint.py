"""The one checkpoint format: a run folder with pet.safetensors (PET parameters only) and run.json."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.pet import PetHandle

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


def save(folder: str | Path, handle: PetHandle, info: dict[str, Any]) -> Path:
    """Write the handle's parameters and `info` (method, config, backbone, metrics...) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(handle.state_dict(), str(folder / WEIGHTS), metadata={"method": handle.method})
    info = {**info, "versions": package_versions()}
    (folder / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return folder


def read(path: str | Path) -> tuple[dict[str, Any], Path]:
    """run.json's content and the weights file, from a run folder or its .safetensors file."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights.name}: only .safetensors checkpoints are loaded")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such checkpoint file")
    info_file = weights.parent / RUN_INFO
    if not info_file.is_file():
        raise CheckpointError(f"{info_file}: missing; a checkpoint is a folder with {WEIGHTS} and {RUN_INFO}")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{info_file}: not valid JSON ({error})") from error
    for key in ("method", "config", "backbone"):
        if key not in info:
            raise CheckpointError(f"{info_file}: has no '{key}'")
    return info, weights


def load_into(handle: PetHandle, weights: str | Path) -> None:
    """Load a weights file into an attached handle, checking every name and shape."""
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{Path(weights).name}: not a readable safetensors file ({error})") from error
    try:
        handle.load_state_dict(state)
    except ValueError as error:
        raise CheckpointError(f"{Path(weights).name}: {error}") from error
