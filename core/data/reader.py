"""The one dataset reader: a folder or .zip with captions.csv or data.jsonl, validated whole.

Every entry point (CLI, app, tests, bench) reads data through `read_dataset`. Problems are
collected, not raised one at a time, so a user sees the full validation report at once.
Rows are the manifest's line numbers (the CSV header is row 1).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

from PIL import Image

from core.data.archive import extract_zip
from core.data.errors import DatasetError, Problem
from core.data.limits import DEFAULT_LIMITS, Limits
from core.data.media import IMAGE_TYPES, VIDEO_TYPES

MANIFESTS = ("captions.csv", "data.jsonl")
SPLITS = ("train", "test")


@dataclass
class QA:
    question: str
    answers: tuple[str, ...]


@dataclass
class Item:
    """One media file with everything the manifest says about it (several rows may name it)."""

    media: str
    kind: str
    captions: list[str] = field(default_factory=list)
    qa: list[QA] = field(default_factory=list)
    split: Optional[str] = None
    rows: list[int] = field(default_factory=list)


@dataclass
class Dataset:
    root: Path
    manifest: str
    items: list[Item]
    fingerprint: str

    def path(self, item: Item) -> Path:
        return self.root / item.media

    def split(self, name: str) -> list[Item]:
        return [item for item in self.items if item.split == name]

    def stats(self) -> dict:
        return {
            "items": len(self.items),
            "captions": sum(len(i.captions) for i in self.items),
            "questions": sum(len(i.qa) for i in self.items),
            "train": len(self.split("train")),
            "test": len(self.split("test")),
        }


def read_dataset(source: str | Path, workdir: str | Path, limits: Limits = DEFAULT_LIMITS,
                 test_fraction: float = 0.2) -> Dataset:
    """Read and validate a dataset; a .zip is extracted into `workdir`/dataset, nothing else is written."""
    source = Path(source)
    if not source.exists():
        raise DatasetError([Problem(str(source), "not found")])
    if source.is_file():
        if source.suffix.lower() != ".zip":
            raise DatasetError([Problem(source.name, "expected a folder or a .zip archive")])
        destination = Path(workdir) / "dataset"
        if destination.exists():
            raise DatasetError([Problem(str(destination), "already exists: use a fresh working folder")])
        root = extract_zip(source, destination, limits)
    else:
        root = source
    root, manifest = _find_manifest(root.resolve(), source.name)
    raw = manifest.read_bytes()
    rows = _parse_csv(manifest.name, raw) if manifest.suffix == ".csv" else _parse_jsonl(manifest.name, raw)
    if len(rows) > limits.max_files:
        raise DatasetError([Problem(manifest.name, f"has {len(rows)} rows, more than the limit of {limits.max_files}")])
    items = _collect_items(root, manifest.name, rows, limits)
    _assign_splits(items, manifest.name, test_fraction)
    return Dataset(root=root, manifest=manifest.name, items=items, fingerprint=_fingerprint(raw, root, items))


def _find_manifest(root: Path, shown: str) -> tuple[Path, Path]:
    found = [root / m for m in MANIFESTS if (root / m).is_file()]
    if not found:
        # An archive of a folder holds the manifest one level down.
        subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX"))]
        if len(subdirs) == 1:
            return _find_manifest(subdirs[0], shown)
        raise DatasetError([Problem(shown, "no manifest found: add captions.csv or data.jsonl at the top level")])
    if len(found) > 1:
        raise DatasetError([Problem(shown, "has both captions.csv and data.jsonl: keep one")])
    if not found[0].resolve().is_relative_to(root):
        raise DatasetError([Problem(found[0].name, "path escapes the dataset folder")])
    return root, found[0]


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        row = raw[: error.start].count(b"\n") + 1
        raise DatasetError([Problem(name, "is not UTF-8 text (save it as UTF-8)", row)]) from error


def _parse_csv(name: str, raw: bytes) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(_decode(name, raw), newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("file", "caption") if c not in columns]
    if missing:
        raise DatasetError([Problem(name, f"missing column(s) {', '.join(missing)}: the header must have "
                                          f"file,caption (found: {', '.join(columns) or 'nothing'})", 1)])
    reader.fieldnames = columns
    rows = []
    for record in reader:
        if None in record:
            raise DatasetError([Problem(name, "has more fields than the header", reader.line_num)])
        if not any((v or "").strip() for v in record.values()):
            continue  # blank line
        rows.append((reader.line_num, {"image": record["file"], "caption": record["caption"],
                                       **({"split": record["split"]} if record.get("split") else {})}))
    return rows


def _parse_jsonl(name: str, raw: bytes) -> list[tuple[int, dict]]:
    rows, problems = [], []
    for number, line in enumerate(_decode(name, raw).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(name, f"not valid JSON ({error.msg})", number))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(name, "each line must be a JSON object", number))
            continue
        rows.append((number, record))
    if problems:
        raise DatasetError(problems)
    return rows


def _check_row(name: str, number: int, record: dict) -> tuple[Optional[str], list[Problem]]:
    """The row's media path (or None) and its problems of form (not of the media file)."""
    problems = []
    media_keys = [k for k in ("image", "video") if k in record]
    if len(media_keys) != 1:
        return None, [Problem(name, "each row needs exactly one of 'image' or 'video'", number)]
    media = record[media_keys[0]]
    if not isinstance(media, str) or not media.strip():
        return None, [Problem(name, f"'{media_keys[0]}' must be a non-empty file name", number)]
    has_caption, has_qa = "caption" in record, "question" in record or "answer" in record
    if not has_caption and not has_qa:
        problems.append(Problem(name, "needs a 'caption', or a 'question' with an 'answer'", number))
    if has_caption and (not isinstance(record["caption"], str) or not record["caption"].strip()):
        problems.append(Problem(name, "empty caption", number))
    if has_qa:
        question, answers = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            problems.append(Problem(name, "empty or missing question", number))
        answers = answers if isinstance(answers, list) else [answers]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            problems.append(Problem(name, "'answer' must be a non-empty string or list of strings", number))
    split = record.get("split")
    if split is not None and split not in SPLITS:
        problems.append(Problem(name, f"split must be train or test, not '{split}'", number))
    return media.strip(), problems


def _check_media(root: Path, media: str, limits: Limits) -> Optional[str]:
    """What is wrong with one media file, or None."""
    if PurePosixPath(media).is_absolute() or PureWindowsPath(media).is_absolute() or PureWindowsPath(media).drive:
        return "absolute paths are not allowed: name files relative to the dataset folder"
    path = (root / media).resolve()
    if not path.is_relative_to(root):
        return "path escapes the dataset folder"
    if not path.is_file():
        return "file not found"
    if path.suffix.lower() not in IMAGE_TYPES + VIDEO_TYPES:
        return f"unsupported file type '{path.suffix}' (supported: {', '.join(IMAGE_TYPES + VIDEO_TYPES)})"
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        return f"file is {size} bytes, more than the limit of {limits.max_file_bytes}"
    if path.suffix.lower() in VIDEO_TYPES:
        return _check_video(path, limits)
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > limits.max_image_pixels:
                return f"image has {pixels} pixels ({image.width}×{image.height}), more than the limit of {limits.max_image_pixels}"
            image.verify()
    except Image.DecompressionBombError:
        return f"image has too many pixels (limit {limits.max_image_pixels})"
    except Exception as error:  # PIL reports broken files through many exception types
        return f"unreadable image ({type(error).__name__}: {error})"
    return None


def _check_video(path: Path, limits: Limits) -> Optional[str]:
    import decord

    try:
        reader = decord.VideoReader(str(path))
        frames, fps = len(reader), reader.get_avg_fps()
        height, width = reader[0].shape[:2] if frames else (0, 0)
    except Exception as error:  # decord reports broken files through its own and runtime errors
        return f"unreadable video ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if frames == 0:
        return "video has no frames"
    if frames > limits.max_video_frames:
        return f"video has {frames} frames, more than the limit of {limits.max_video_frames}"
    seconds = frames / fps if fps > 0 else 0.0
    if seconds > limits.max_video_seconds:
        return f"video is {seconds:.0f} s long, more than the limit of {limits.max_video_seconds:.0f} s"
    if width * height > limits.max_image_pixels:
        return f"video frames have {width * height} pixels, more than the limit of {limits.max_image_pixels}"
    return None


def _collect_items(root: Path, name: str, rows: list[tuple[int, dict]], limits: Limits) -> list[Item]:
    problems: list[Problem] = []
    items: dict[str, Item] = {}
    media_problem: dict[str, Optional[str]] = {}
    for number, record in rows:
        media, row_problems = _check_row(name, number, record)
        problems += row_problems
        if media is None:
            continue
        if media not in media_problem:
            media_problem[media] = _check_media(root, media, limits)
        if media_problem[media]:
            problems.append(Problem(f"{name} → {media}", media_problem[media], number))
            continue
        if row_problems:
            continue
        key = PurePosixPath((root / media).resolve().relative_to(root).as_posix()).as_posix()
        kind = "video" if Path(key).suffix.lower() in VIDEO_TYPES else "image"
        if ("video" in record and kind != "video") or ("image" in record and kind != "image"):
            problems.append(Problem(name, f"'{media}' is listed as {'a video' if 'video' in record else 'an image'} "
                                          f"but is {'a video' if kind == 'video' else 'an image'} file", number))
            continue
        item = items.setdefault(key, Item(media=key, kind=kind))
        item.rows.append(number)
        if "caption" in record:
            item.captions.append(record["caption"].strip())
        if "question" in record:
            answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
            item.qa.append(QA(record["question"].strip(), tuple(a.strip() for a in answers)))
        split = record.get("split")
        if split is not None:
            if item.split not in (None, split):
                problems.append(Problem(name, f"{media} is in both the train and the test split", number))
            item.split = split
    if problems:
        raise DatasetError(problems)
    if not items:
        raise DatasetError([Problem(name, "has no rows")])
    if len({item.kind for item in items.values()}) > 1:
        raise DatasetError([Problem(name, "mixes images and videos: make one dataset of each")])
    return list(items.values())


def _assign_splits(items: list[Item], name: str, test_fraction: float) -> None:
    given = [i for i in items if i.split is not None]
    if given and len(given) < len(items):
        first = next(i for i in items if i.split is None)
        raise DatasetError([Problem(name, "some rows have a split and others don't: give every row one, or none",
                                    first.rows[0])])
    if given:
        return
    # No split given: a fixed, content-independent choice, so every run sees the same test set.
    order = sorted(items, key=lambda i: hashlib.sha1(i.media.encode()).hexdigest())
    n_test = max(1, round(test_fraction * len(items))) if len(items) > 1 else 0
    for position, item in enumerate(order):
        item.split = "test" if position < n_test else "train"


def _fingerprint(manifest: bytes, root: Path, items: list[Item]) -> str:
    digest = hashlib.sha256(manifest)
    for item in sorted(items, key=lambda i: i.media):
        digest.update(item.media.encode())
        digest.update((root / item.media).read_bytes())
    return digest.hexdigest()[:16]
