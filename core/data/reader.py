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
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

from PIL import Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from core.data.archive import extract_zip
from core.data.errors import DatasetError, Problem, describe
from core.data.limits import DEFAULT_LIMITS, Limits
from core.data.media import DEFAULT_FRAMES, IMAGE_TYPES, VIDEO_TYPES, open_image, sample_indices
from core.data.names import name_problem

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
    """Read and validate a dataset; a .zip is extracted into `workdir`/dataset, nothing else is written.

    When the dataset is refused, what was extracted is removed again (and any folders made for it)."""
    source = Path(source)
    try:
        is_file, is_folder = source.is_file(), source.is_dir()
    except OSError as error:
        raise DatasetError([Problem(source.name, f"cannot be read ({error.strerror})")]) from error
    if not is_file and not is_folder and not source.exists():
        raise DatasetError([Problem(str(source), "not found")])
    if is_folder:
        return _read_folder(source, source.name, limits, test_fraction)
    if not is_file or source.suffix.lower() != ".zip":
        raise DatasetError([Problem(source.name, "expected a folder or a .zip archive")])
    destination = Path(workdir) / "dataset"
    if destination.exists():
        raise DatasetError([Problem(str(destination), "already exists: use a fresh working folder")])
    created = [destination, *(p for p in destination.parents if not p.exists())]
    try:
        return _read_folder(extract_zip(source, destination, limits), source.name, limits, test_fraction)
    except BaseException:
        _remove_created(created)
        raise


def _remove_created(folders: list[Path]) -> None:
    """Remove the extraction folder, then the folders made to hold it, innermost first, while empty."""
    shutil.rmtree(folders[0], ignore_errors=True)
    for parent in folders[1:]:
        try:
            parent.rmdir()
        except OSError:   # not empty: something else is in there now
            return


def _read_folder(folder: Path, shown: str, limits: Limits, test_fraction: float) -> Dataset:
    root, manifest = _find_manifest(folder.resolve(), shown)
    raw = _read_manifest(manifest, limits)
    parse = _parse_csv if manifest.suffix == ".csv" else _parse_jsonl
    rows = parse(manifest.name, raw, limits.max_files)
    items = _collect_items(root, manifest.name, rows, limits)
    _assign_splits(items, manifest.name, test_fraction)
    return Dataset(root=root, manifest=manifest.name, items=items, fingerprint=_fingerprint(raw, root, items))


def _find_manifest(root: Path, shown: str) -> tuple[Path, Path]:
    """The folder holding the manifest, and the manifest: at the top, or down a chain of single folders
    (an archive of a folder holds the manifest one level down)."""
    while not (present := [m for m in MANIFESTS if os.path.lexists(root / m)]):
        try:
            subdirs = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()
                       and not d.name.startswith((".", "__MACOSX"))]
        except OSError as error:
            raise DatasetError([Problem(shown, f"cannot be read ({error.strerror})")]) from error
        if len(subdirs) != 1:
            raise DatasetError([Problem(shown, "no manifest found: add captions.csv or data.jsonl at the top level")])
        root = subdirs[0]
    if len(present) > 1:
        raise DatasetError([Problem(shown, "has both captions.csv and data.jsonl: keep one")])
    manifest, problem = _locate(root, present[0])
    if problem:
        raise DatasetError([Problem(present[0], problem)])
    return root, manifest


def _locate(root: Path, relative: str) -> tuple[Optional[Path], Optional[str]]:
    """The file that `relative` (a checked name) names inside `root`, or what is wrong with it."""
    try:
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            return None, "path escapes the dataset folder"
        if problem := _file_problem(path):
            return None, problem
    except RuntimeError:   # how Path.resolve reports a symbolic link loop
        return None, "symbolic link loop"
    except OSError as error:
        return None, f"cannot be read ({error.strerror})"
    return path, None


def _read_manifest(manifest: Path, limits: Limits) -> bytes:
    try:
        size = manifest.stat().st_size
        if size > limits.max_manifest_bytes:
            raise DatasetError([Problem(manifest.name, f"is {size} bytes, more than the limit of "
                                                       f"{limits.max_manifest_bytes}")])
        return manifest.read_bytes()
    except OSError as error:
        raise DatasetError([Problem(manifest.name, f"cannot be read ({error.strerror})")]) from error


def _too_many_rows(name: str, max_rows: int) -> DatasetError:
    return DatasetError([Problem(name, f"has more than {max_rows} rows (the limit)")])


def _decode(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        row = raw[: error.start].count(b"\n") + 1
        raise DatasetError([Problem(name, "is not UTF-8 text (save it as UTF-8)", row)]) from error


def _parse_csv(name: str, raw: bytes, max_rows: int) -> list[tuple[int, dict]]:
    """Rows as records of the data.jsonl form: the file's extension says whether it is an image or a video."""
    reader = csv.reader(io.StringIO(_decode(name, raw), newline=""))
    rows = []
    try:
        columns = [c.strip() for c in next(reader, [])]
        missing = [c for c in ("file", "caption") if c not in columns]
        if missing:
            raise DatasetError([Problem(name, f"missing column(s) {', '.join(missing)}: the header must have "
                                              f"file,caption (found: {', '.join(columns) or 'nothing'})", 1)])
        for fields in reader:
            if len(fields) > len(columns):
                raise DatasetError([Problem(name, "has more fields than the header", reader.line_num)])
            if not any(v.strip() for v in fields):
                continue  # blank line
            if len(rows) == max_rows:
                raise _too_many_rows(name, max_rows)
            record = dict(zip(columns, fields + [""] * (len(columns) - len(fields))))
            kind = "video" if PurePosixPath(record["file"].strip()).suffix.lower() in VIDEO_TYPES else "image"
            rows.append((reader.line_num, {kind: record["file"], "caption": record["caption"],
                                           **({"split": record["split"]} if record.get("split") else {})}))
    except csv.Error as error:   # e.g. a field longer than the csv module's limit
        raise DatasetError([Problem(name, f"cannot be read as CSV ({error})", reader.line_num)]) from error
    return rows


def _parse_jsonl(name: str, raw: bytes, max_rows: int) -> list[tuple[int, dict]]:
    rows, problems = [], []
    lines = [(number, line) for number, line in enumerate(_decode(name, raw).split("\n"), start=1) if line.strip()]
    if len(lines) > max_rows:
        raise _too_many_rows(name, max_rows)
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(name, f"not valid JSON ({error.msg})", number))
            continue
        except RecursionError:
            problems.append(Problem(name, "not valid JSON (nested too deeply)", number))
            continue
        except ValueError:   # what json raises for an integer longer than Python converts
            problems.append(Problem(name, "not valid JSON (a number has too many digits)", number))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(name, "each line must be a JSON object", number))
            continue
        rows.append((number, record))
    if problems:
        raise DatasetError(problems)
    return rows


def _text_problem(key: str, value) -> Optional[str]:
    """What is wrong with `value` as the text of field `key`, or None."""
    if value is None:
        return f"missing {key}"
    if not isinstance(value, str):
        return f"'{key}' must be text, not {type(value).__name__}"
    if not value.strip():
        return f"empty {key}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate from a JSON \ud800 escape: no tokenizer takes it
        return f"'{key}' is not valid Unicode text"
    return None


def _check_row(name: str, number: int, record: dict, limits: Limits) -> tuple[Optional[str], list[Problem]]:
    """The row's media path (or None) and its problems of form (not of the media file)."""
    problems = []
    media_keys = [k for k in ("image", "video") if k in record]
    if len(media_keys) != 1:
        return None, [Problem(name, "each row needs exactly one of 'image' or 'video'", number)]
    media = record[media_keys[0]]
    if not isinstance(media, str):
        return None, [Problem(name, f"'{media_keys[0]}' must be a file name, not {type(media).__name__}", number)]
    if not media.strip():
        return None, [Problem(name, "the file name is empty", number)]
    if problem := name_problem(media.strip(), limits):
        return None, [Problem(f"{name} → {media.strip()[:100]}", problem, number)]
    has_caption, has_qa = "caption" in record, "question" in record or "answer" in record
    if not has_caption and not has_qa:
        problems.append(Problem(name, "needs a 'caption', or a 'question' with an 'answer'", number))
    if has_caption and (problem := _text_problem("caption", record["caption"])):
        problems.append(Problem(name, problem, number))
    if has_qa:
        if problem := _text_problem("question", record.get("question")):
            problems.append(Problem(name, problem, number))
        answers = record.get("answer")
        answers = answers if isinstance(answers, list) else [answers]
        if not answers or any(_text_problem("answer", a) for a in answers):
            problems.append(Problem(name, "'answer' must be a non-empty string or list of strings", number))
    split = record.get("split")
    if split is not None and split not in SPLITS:
        problems.append(Problem(name, f"split must be train or test, not '{str(split)[:40]}'", number))
    return media.strip(), problems


def _file_problem(path: Path) -> Optional[str]:
    """What keeps `path` from being read as a file: a folder, a pipe or a device (a reader would
    block, or never end), nothing there; None for a regular file."""
    if path.is_dir():
        return "is a folder, not a file"
    if not path.is_file():
        return "is not a regular file" if path.exists() else "file not found"
    return None


def _check_media(root: Path, media: str, limits: Limits) -> tuple[Optional[str], Optional[str]]:
    """The media file's path relative to `root` (one key per file, however a row spells it),
    or what is wrong with it."""
    path, problem = _locate(root, media)
    if problem or (problem := media_problem(path, limits)):
        return None, problem
    return path.relative_to(root).as_posix(), None


def media_problem(path: Path, limits: Limits = DEFAULT_LIMITS) -> Optional[str]:
    """What is wrong with one media file — type, size, pixels, decoding — or None. The dataset's
    rules, also applied to a lone file (a query's picture or clip)."""
    if path.suffix.lower() not in IMAGE_TYPES + VIDEO_TYPES:
        return f"unsupported file type '{path.suffix}' (supported: {', '.join(IMAGE_TYPES + VIDEO_TYPES)})"
    if problem := _file_problem(path):
        return problem
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        return f"file is {size} bytes, more than the limit of {limits.max_file_bytes}"
    check = _check_video if path.suffix.lower() in VIDEO_TYPES else _check_image
    return check(path, limits)


def _check_image(path: Path, limits: Limits) -> Optional[str]:
    """Opened and decoded whole, as training will (the pixel count is checked before decoding)."""
    try:
        with open_image(path) as image:
            pixels = image.width * image.height
            if pixels > limits.max_image_pixels:
                return f"image has {pixels} pixels ({image.width}×{image.height}), more than the limit of {limits.max_image_pixels}"
            if isinstance(image, JpegImageFile):
                # At 1/8 scale libjpeg still reads the whole stream, so a truncated or corrupt
                # file fails here as it would in training, at a fraction of the cost.
                image.draft("RGB", (1, 1))
            image.convert("RGB")
    except Image.DecompressionBombError:
        return f"image has too many pixels (limit {limits.max_image_pixels})"
    except UnidentifiedImageError:
        return "unreadable image (not a JPEG, PNG, WebP or BMP file)"
    except Exception as error:  # PIL reports broken files through many exception types
        return f"unreadable image ({describe(error)})"
    return None


def _check_video(path: Path, limits: Limits) -> Optional[str]:
    import decord

    try:
        return _video_problem(decord.VideoReader(str(path)), limits)
    except Exception as error:  # decord reports broken files through its own and runtime errors
        return f"unreadable video ({describe(error)})"


def _video_problem(reader, limits: Limits) -> Optional[str]:
    """Checked from the container's counts first, then from one decoded frame, before more are decoded."""
    frames, fps = len(reader), reader.get_avg_fps()
    if frames == 0:
        return "video has no frames"
    if frames > limits.max_video_frames:
        return f"video has {frames} frames, more than the limit of {limits.max_video_frames}"
    seconds = frames / fps if fps > 0 else 0.0
    if seconds > limits.max_video_seconds:
        return f"video is {seconds:.0f} s long, more than the limit of {limits.max_video_seconds:.0f} s"
    height, width = reader[0].shape[:2]
    if width * height > limits.max_image_pixels:
        return f"video frames have {width * height} pixels, more than the limit of {limits.max_image_pixels}"
    # The frames a run reads by default: a file damaged there fails now, not during training.
    reader.get_batch(sample_indices(frames, DEFAULT_FRAMES))
    return None


def _collect_items(root: Path, name: str, rows: list[tuple[int, dict]], limits: Limits) -> list[Item]:
    problems: list[Problem] = []
    items: dict[str, Item] = {}
    checked: dict[str, tuple[Optional[str], Optional[str]]] = {}
    for number, record in rows:
        media, row_problems = _check_row(name, number, record, limits)
        problems += row_problems
        if media is None:
            continue
        if media not in checked:
            checked[media] = _check_media(root, media, limits)
        key, media_problem = checked[media]
        if media_problem:
            problems.append(Problem(f"{name} → {media}", media_problem, number))
            continue
        if row_problems:
            continue
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
