"""A folder of pictures and clips embedded once by one model and searched by text or by example.

`build_index` walks a folder, embeds every picture and clip the dataset reader would accept (the
others are skipped with the reader's reason), and keeps in the index folder:

    index.json     the model (spec, run, weights fingerprint), the folder, frames, the FAISS index's kind
    items.jsonl    one line per embedded file: path under the folder, size, mtime
    vectors.f32    their L2-normalised embeddings, float32, one row per line of items.jsonl
    faiss.index    the FAISS index over those rows (core.vector_index)
    skipped.json   the files left out, and why

items.jsonl and vectors.f32 grow batch by batch, so an interrupted run resumes: a file whose path,
size and mtime are already recorded is not embedded again. Only these files are ever written or
replaced, and only inside the index folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from core.backbones import Backbone
from core.data import DatasetError
from core.data.errors import describe
from core.data.media import DEFAULT_FRAMES, IMAGE_TYPES, VIDEO_TYPES, load_media
from core.data.reader import media_problem
from core.pet import PetHandle
from core.result import load_json, read_record
from core.tasks.encoding import embed_media, evaluating
from core.vector_index import EXACT_UP_TO, IndexInfo, VectorIndex, VectorIndexError

RECORD, ITEMS, VECTORS, FAISS_INDEX, SKIPPED = "index.json", "items.jsonl", "vectors.f32", "faiss.index", "skipped.json"
OWN_FILES = (RECORD, ITEMS, VECTORS, FAISS_INDEX, SKIPPED)
FORMAT = 1


class MediaIndexError(ValueError):
    """An index that cannot be built or searched as asked, with a message meant for the user."""


def model_fingerprint(backbone: Backbone, handle: Optional[PetHandle] = None) -> str:
    """A hash of every weight the embeddings depend on: the backbone's and the run's PET weights."""
    digest = hashlib.blake2b(digest_size=16)
    tensors = dict(backbone.state_dict())
    if handle is not None:
        tensors.update({f"pet.{k}": v for k, v in handle.state_dict().items()})
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Entry:
    path: str        # under the indexed folder, with forward slashes
    size: int
    mtime_ns: int
    kind: str        # image or video


@dataclass
class IndexRecord:
    model: str
    pet: Optional[str]
    fingerprint: str
    folder: str
    frames: int
    complete: bool = False
    index: Optional[IndexInfo] = None
    format: int = FORMAT

    @classmethod
    def read(cls, folder: Path) -> "IndexRecord":
        path = folder / RECORD
        try:
            record = read_record(cls, load_json(path), RECORD)   # every field of its type (core.result)
        except FileNotFoundError as error:
            raise MediaIndexError(f"{folder}: not an index (no {RECORD}); build one with `python -m core index`") from error
        except (OSError, ValueError) as error:
            raise MediaIndexError(f"{path}: not an index record PET Studio wrote ({describe(error)})") from error
        if record.format != FORMAT:
            raise MediaIndexError(f"{path}: index format {record.format}, this PET Studio reads {FORMAT}: index again")
        return record

    def write(self, folder: Path) -> None:
        _replace(folder / RECORD, (json.dumps(asdict(self), indent=2) + "\n").encode("utf-8"))


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all, never through a link left in the folder."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)   # a leftover, or a planted link: made afresh below
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as file:
        file.write(data)
    os.replace(partial, path)


def _media_files(root: Path, skip: Path) -> Iterator[tuple[Path, Optional[str]]]:
    """Every picture or clip under `root` (sorted, links not followed), with why it is left out
    (a link) or None; `skip` (the index folder, when it lies inside) is not entered."""
    for folder, subfolders, files in os.walk(root, followlinks=False):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if (here / d).resolve() != skip)
        for name in sorted(files):
            path = here / name
            if path.suffix.lower() not in IMAGE_TYPES + VIDEO_TYPES:
                continue
            yield path, "a link (links are not followed)" if path.is_symlink() else None


def _entries(path: Path) -> list[bytes]:
    """items.jsonl's lines (the last one empty when the file ends whole), from a plain file only: a pipe would block."""
    if not path.is_file():
        raise MediaIndexError(f"{path}: not a file PET Studio wrote: index into a new folder")
    return path.read_bytes().split(b"\n")


def _entry(line: bytes, where: Path) -> Entry:
    """One line of items.jsonl, read as hostile: its fields of their types (an mtime in ns is past
    what core.result's reader takes), its path one under the folder."""
    try:
        entry = Entry(**json.loads(line))
        if not (isinstance(entry.path, str) and type(entry.size) is int and type(entry.mtime_ns) is int
                and entry.kind in ("image", "video")):
            raise ValueError("a field of another type")
    except (ValueError, TypeError) as error:   # JSONDecodeError; not an object, other fields
        raise MediaIndexError(f"{where}: a line PET Studio did not write ({describe(error)}): "
                              f"index into a new folder") from error
    parts = PurePosixPath(entry.path).parts
    if not parts or entry.path.startswith("/") or ".." in parts:
        raise MediaIndexError(f"{where}: {entry.path[:100]!r} is not a path under the indexed folder: "
                              f"index into a new folder")
    return entry


def _recorded(out: Path, dim: int) -> dict[str, tuple[Entry, np.ndarray]]:
    """What an earlier run embedded: the rows whose line and vector were both written whole."""
    if not (out / ITEMS).exists() or not (out / VECTORS).exists():
        return {}
    lines = _entries(out / ITEMS)
    vectors = np.fromfile(out / VECTORS, dtype=np.float32)
    rows = min(len(lines) - 1, len(vectors) // dim)   # the last line is whole only when it ends in \n
    vectors = vectors[:rows * dim].reshape(rows, dim)
    if not np.isfinite(vectors).all():
        raise MediaIndexError(f"{out / VECTORS}: holds values that are not finite, which no model wrote here: "
                              f"index into a new folder")
    return {(entry := _entry(line, out / ITEMS)).path: (entry, vector) for line, vector in zip(lines[:rows], vectors)}


def _embedding_dim(backbone: Backbone) -> int:
    """The joint space's width (the text tower's output is the cheapest way to see it)."""
    with torch.no_grad(), evaluating(backbone):
        return int(backbone.encode_text(backbone.tokenize(["a"]).to(backbone.device)).shape[-1])


@dataclass
class IndexReport:
    index: str
    folder: str
    items: int
    embedded: int                 # this run
    reused: int                   # embedded by an earlier run, unchanged since
    skipped: list[dict] = field(default_factory=list)   # {"path", "problem"}
    kind: str = "exact"
    probes: Optional[int] = None
    recall_at_10: Optional[float] = None


def build_index(backbone: Backbone, folder: str | Path, out: str | Path, model: str, pet: Optional[str] = None,
                handle: Optional[PetHandle] = None, frames: int = DEFAULT_FRAMES, batch_size: int = 32,
                exact_up_to: int = EXACT_UP_TO, progress: bool = True) -> IndexReport:
    """Embed every picture and clip under `folder` into the index folder `out` (resuming one
    this model started there) and build its FAISS index."""
    root, out = Path(folder).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise MediaIndexError(f"{folder}: not a folder")
    fingerprint = model_fingerprint(backbone, handle)
    record = IndexRecord(model, pet, fingerprint, str(root), frames)
    if out.exists():
        if not out.is_dir():
            raise MediaIndexError(f"{out}: exists and is not a folder")
        if (out / RECORD).exists():
            _check_same_build(IndexRecord.read(out), record, out)
        elif any(out.iterdir()):
            raise MediaIndexError(f"{out}: a folder with other files in it; give a new or empty folder for the index")
    out.mkdir(parents=True, exist_ok=True)
    record.write(out)

    dim = _embedding_dim(backbone)
    recorded = _recorded(out, dim)
    entries, vectors, todo, skipped = [], [], [], []
    for path, problem in _media_files(root, out):
        relative = path.relative_to(root).as_posix()
        if problem:
            skipped.append({"path": relative, "problem": problem})
            continue
        stat = path.stat()
        kind = "video" if path.suffix.lower() in VIDEO_TYPES else "image"
        entry = Entry(relative, stat.st_size, stat.st_mtime_ns, kind)
        earlier = recorded.get(relative)
        if earlier is not None and earlier[0] == entry:
            entries.append(entry)
            vectors.append(earlier[1])
        else:
            todo.append(entry)
    reused = len(entries)
    # Keep only what is still current, so the logs below grow from a consistent start.
    _replace(out / ITEMS, b"".join(json.dumps(asdict(e)).encode() + b"\n" for e in entries))
    _replace(out / VECTORS, np.asarray(vectors, dtype=np.float32).reshape(-1, dim).tobytes())

    todo.sort(key=lambda e: e.kind)   # a batch holds one kind: pictures and clips differ in shape
    merged = handle is not None and handle.mergeable
    if merged:
        handle.merge()
    try:
        with open(out / ITEMS, "ab") as items_log, open(out / VECTORS, "ab") as vectors_log, \
                tqdm(total=len(todo), unit="file", desc="embedding", file=sys.stderr, disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                loaded, pixels = [], []
                for entry in batch:
                    path = root / entry.path
                    problem = media_problem(path)
                    if problem is None:
                        try:
                            pixels.append(load_media(path, entry.kind, backbone.image_transform, frames))
                            loaded.append(entry)
                            continue
                        except DatasetError as error:
                            problem = str(error.problems[0].message)
                    skipped.append({"path": entry.path, "problem": problem})
                for kind in ("image", "video"):
                    chosen = [i for i, e in enumerate(loaded) if e.kind == kind]
                    if not chosen:
                        continue
                    embedded = embed_media(backbone, torch.stack([pixels[i] for i in chosen])).numpy()
                    if not np.isfinite(embedded).all():
                        raise MediaIndexError(f"{root / loaded[chosen[0]].path}: the model gives embeddings that are "
                                              f"not finite numbers (NaN or infinite): it is broken, so nothing more "
                                              f"is indexed")
                    vectors_log.write(np.ascontiguousarray(embedded, dtype=np.float32).tobytes())
                    vectors_log.flush()
                    items_log.write(b"".join(json.dumps(asdict(loaded[i])).encode() + b"\n" for i in chosen))
                    items_log.flush()
                    entries += [loaded[i] for i in chosen]
                    vectors += list(embedded)
                bar.update(len(batch))
    finally:
        if merged:
            handle.unmerge()

    _replace(out / SKIPPED, (json.dumps(skipped, indent=2) + "\n").encode("utf-8"))
    if not entries:
        raise MediaIndexError(f"{root}: no picture or clip could be indexed "
                              f"({len(skipped)} skipped, see {out / SKIPPED})")
    index = VectorIndex.build(np.stack(vectors), exact_up_to=exact_up_to)
    index.save(out / FAISS_INDEX)
    record.complete, record.index = True, index.info
    record.write(out)
    return IndexReport(str(out), str(root), len(entries), len(entries) - reused, reused, skipped,
                       index.info.kind, index.info.probes, index.info.recall_at_10)


def _check_same_build(earlier: IndexRecord, now: IndexRecord, out: Path) -> None:
    if earlier.folder != now.folder:
        raise MediaIndexError(f"{out}: indexes {earlier.folder}, not {now.folder}; give a new folder for the index")
    if earlier.fingerprint != now.fingerprint:
        raise MediaIndexError(f"{out}: started by another model ({earlier.model}"
                              f"{', run ' + earlier.pet if earlier.pet else ''}); give a new folder for this one")
    if earlier.frames != now.frames:
        raise MediaIndexError(f"{out}: started with {earlier.frames} frames per clip, not {now.frames}")


@dataclass
class Found:
    path: str     # the file, under the indexed folder's path
    score: float  # cosine similarity


class MediaIndex:
    """A finished index, opened for searching."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.record = IndexRecord.read(self.folder)
        if not self.record.complete or self.record.index is None:
            raise MediaIndexError(f"{self.folder}: the index was not finished; run `python -m core index` "
                                  f"again with the same --out to resume it")
        self.paths = [_entry(line, self.folder / ITEMS).path for line in _entries(self.folder / ITEMS) if line]
        if not (self.folder / FAISS_INDEX).is_file():
            raise MediaIndexError(f"{self.folder / FAISS_INDEX}: not a file PET Studio wrote: index the folder again")
        try:
            self.vectors = VectorIndex.load(self.folder / FAISS_INDEX, self.record.index)
        except (RuntimeError, VectorIndexError) as error:   # FAISS raises RuntimeError on a file it cannot read
            raise MediaIndexError(f"{self.folder / FAISS_INDEX}: {describe(error)}") from error
        if len(self.paths) != self.record.index.items:
            raise MediaIndexError(f"{self.folder / ITEMS}: {len(self.paths)} files for {self.record.index.items} "
                                  f"vectors: index the folder again")

    def check_model(self, backbone: Backbone, handle: Optional[PetHandle] = None) -> None:
        """Refuse a model other than the one whose embeddings the index holds."""
        if model_fingerprint(backbone, handle) != self.record.fingerprint:
            run = f", run {self.record.pet}" if self.record.pet else ""
            raise MediaIndexError(f"{self.folder}: built by another model ({self.record.model}{run}); its "
                                  f"vectors mean nothing to this one: search with that model, or index again")

    def search(self, query: torch.Tensor, k: int = 10) -> list[Found]:
        try:
            scores, ids = self.vectors.search(query, k)
        except VectorIndexError as error:
            raise MediaIndexError(str(error)) from error
        root = Path(self.record.folder)
        return [Found(str(root / self.paths[i]), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
