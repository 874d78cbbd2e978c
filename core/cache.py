"""What runs compute once and keep on disk: zero-shot scores (a run on the same backbone weights,
dataset, task, frames and answers does not score the untuned model again) and learning-rate range
tests (core.lr_range). The CLI keeps them under the user's cache directory, the app in the
session's folder (a ZeroGPU call runs in another process, so an in-memory dict would not come back).

One JSON file per key, named by the key's hash and holding the key itself, written atomically.
A file that does not read back as that key with a valid value counts as absent, and so does one
that is not a plain file of JSON (core.result.load_json: a pipe, a device, too large, too deep). Backbones read
from a local file or folder are never cached: the file may change under the same name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Iterator

from core.backbones import BackboneError, parse_spec
from core.result import load_json, read_record

CACHE_ENV = "PETSTUDIO_CACHE"


def default_cache_folder() -> Path:
    """$PETSTUDIO_CACHE, else $XDG_CACHE_HOME/petstudio, else ~/.cache/petstudio (zero-shot scores
    go in its `zero-shot` folder, range tests in `lr-range`)."""
    return Path(os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "petstudio")


def _plain(key: tuple) -> list:
    return json.loads(json.dumps(list(key)))


def _cacheable(key: tuple) -> bool:
    try:
        return parse_spec(str(key[0])).weights != "path"
    except BackboneError:
        return False


class JsonCache(MutableMapping):
    """key (a tuple of JSON values, the backbone spec first) -> a value stored as JSON; subclasses
    say how a value is written (`encode`, None to decline) and read back (`decode`, ValueError
    when it is not valid)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def encode(self, value: Any) -> Any:
        raise NotImplementedError

    def decode(self, stored: Any) -> Any:
        raise NotImplementedError

    def _path(self, key: tuple) -> Path:
        digest = hashlib.sha256(json.dumps(_plain(key)).encode("utf-8")).hexdigest()
        return self.folder / f"{digest[:40]}.json"

    def __getitem__(self, key: tuple) -> Any:
        if not _cacheable(key):
            raise KeyError(key)
        try:
            data = load_json(self._path(key))
            if not isinstance(data, dict) or data.get("key") != _plain(key):
                raise ValueError("another key")
            return self.decode(data.get("value"))
        except (OSError, ValueError, TypeError, KeyError):
            raise KeyError(key) from None

    def __setitem__(self, key: tuple, value: Any) -> None:
        stored = self.encode(value)
        if not _cacheable(key) or stored is None:
            return
        path = self._path(key)
        # unique per writer: two threads of one process (concurrent tunings) may keep the same key
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"key": _plain(key), "value": stored}), encoding="utf-8")
            partial.replace(path)
        except OSError as error:   # a cache saves time, nothing more: the run goes on without it
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            warnings.warn(f"{self.folder}: could not keep a result in the cache ({error}); it will be computed "
                          f"again next time", stacklevel=2)

    def __delitem__(self, key: tuple) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[tuple]:
        for path in sorted(self.folder.glob("*.json")):
            try:
                key = load_json(path)["key"]
                yield tuple(tuple(part) if isinstance(part, list) else part for part in key)
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ScoreCache(JsonCache):
    """Zero-shot scores: key -> metrics {name: finite number, not negative} (and the untuned media's
    spread, {"spread": number}, beside them)."""

    def encode(self, metrics: dict[str, float]) -> dict | None:
        return dict(metrics) if all(math.isfinite(v) for v in metrics.values()) else None

    def decode(self, stored: Any) -> dict[str, float]:
        return read_record(dict[str, float], stored, "kept scores")
