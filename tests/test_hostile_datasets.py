"""A generated corpus of hostile, broken and odd datasets.

Every malformed one goes through the CLI's `tune --json` and must end in exit 2 with one
{"error": ...} line that names the file (and row), no traceback, nothing written outside the run
folder and the upload itself untouched. The odd but valid ones must read correctly.
"""
import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from core import world
from core.cli import main
from core.data import DatasetError, read_dataset
from core.data.media import load_media
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
TUNE = ["tune", "--model", TINY, "--method", "lora", "--json"]


# --- Bytes of small media files --------------------------------------------------------------

def picture(size=(8, 8), mode="RGB", colour=(200, 10, 10), format="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format, **options)
    return buffer.getvalue()


PNG = picture()
JPEG = picture((64, 64), colour=(30, 90, 200), format="JPEG")


def noisy_jpeg(**options) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, "JPEG", **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid checksum) claims `width`×`height`: no pixels are ever made."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + PNG[33:]


def clip(path: Path, frames: int = 4, fps=4, colour=(30, 90, 200)) -> Path:
    world.write_clip(path, [Image.new("RGB", (32, 32), colour)] * frames, fps)
    return path


# --- Datasets --------------------------------------------------------------------------------

def folder(tmp: Path, files: dict[str, bytes | str], name: str = "data") -> Path:
    root = tmp / name
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return root


def jsonl(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def csv_set(tmp: Path, manifest: str | bytes, **files: bytes) -> Path:
    """A folder with captions.csv and a.png, b.png, c.png (replaced or joined by `files`)."""
    return folder(tmp, {"a.png": PNG, "b.png": PNG, "c.png": PNG, **files, "captions.csv": manifest})


def jsonl_set(tmp: Path, *rows, **files: bytes) -> Path:
    return folder(tmp, {"a.png": PNG, "b.png": PNG, **files, "data.jsonl": jsonl(*rows)})


GOOD_CSV = "file,caption\na.png,a red square\nb.png,another red square\n"
WITH_B_JPG = "file,caption\na.png,x\nb.jpg,y\n"


def archive(tmp: Path, members: dict[str, bytes | str], compression=zipfile.ZIP_DEFLATED) -> Path:
    path = tmp / "upload.zip"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return path


def good_archive(tmp: Path, **members: bytes) -> Path:
    return archive(tmp, {"captions.csv": GOOD_CSV, "a.png": PNG, "b.png": PNG, **members})


def central_entry(data: bytes, directory_start: int, header_offset: int) -> int:
    """Where the central directory entry of the member whose local header is at `header_offset` starts."""
    entry = directory_start
    while struct.unpack("<I", data[entry + 42:entry + 46])[0] != header_offset:
        name_length, extra_length, comment_length = struct.unpack("<HHH", data[entry + 28:entry + 34])
        entry += 46 + name_length + extra_length + comment_length
    return entry


def patch_headers(path: Path, member: str, local: dict[int, bytes], central: dict[int, bytes]) -> Path:
    """Overwrite bytes at offsets of `member`'s local header and of its central directory entry
    (a lie both places agree on, as a hostile archive would tell it)."""
    with zipfile.ZipFile(path) as zf:
        info, directory_start = zf.getinfo(member), zf.start_dir
    data = bytearray(path.read_bytes())
    entry = central_entry(data, directory_start, info.header_offset)
    for base, patches in ((info.header_offset, local), (entry, central)):
        for offset, value in patches.items():
            data[base + offset:base + offset + len(value)] = value
    path.write_bytes(bytes(data))
    return path


def patch_data(path: Path, member: str, replace: Callable[[bytes], bytes]) -> Path:
    """Replace `member`'s stored (possibly compressed) bytes, keeping their length."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start:start + info.compress_size] = replace(bytes(data[start:start + info.compress_size]))
    path.write_bytes(bytes(data))
    return path


def flip_middle_byte(data: bytes) -> bytes:
    return data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]


def truncated(path: Path, keep: float = 0.5) -> Path:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])
    return path


def archive_with_link(tmp: Path) -> Path:
    path = good_archive(tmp)
    with zipfile.ZipFile(path, "a") as zf:
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return path


def symlinked(root: Path, name: str, target: str | Path) -> Path:
    os.symlink(target, root / name)
    return root


def with_sparse(root: Path, name: str, size: int, head: bytes = b"") -> Path:
    """Adds a file of `size` bytes that costs no disk: `head`, then a hole."""
    with open(root / name, "wb") as sink:
        sink.write(head)
        sink.truncate(size)
    return root


def videos(tmp: Path, manifest: str, names=("v1.mp4", "v2.mp4", "v3.mp4"), **extra: bytes) -> Path:
    """A folder of three small clips and `manifest` (data.jsonl when it holds JSON, else captions.csv)."""
    root = folder(tmp, {**extra, "data.jsonl" if manifest.startswith("{") else "captions.csv": manifest})
    for index, name in enumerate(names):
        clip(root / name, colour=(40 * index, 90, 200))
    return root


def with_long_clip(root: Path) -> Path:
    """Adds long.mp4: 31 frames at one frame every 10 s, so 310 s long for a few hundred bytes."""
    clip(root / "long.mp4", frames=31, fps=Fraction(1, 10))
    return root


# --- The corpus: (id, how to build it, what the error must say) -------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Path]
    expected: str


UNPACK_FAILED = "cannot be unpacked"
MALFORMED = [
    # Archives: escapes, links, bombs, damage
    Case("zip-slip", lambda t: good_archive(t, **{"../evil.png": PNG}),
         "upload.zip/../evil.png: path escapes the dataset folder"),
    Case("zip-slip-backslash", lambda t: good_archive(t, **{"..\\evil.png": PNG}),
         "upload.zip/..\\evil.png: path escapes the dataset folder"),
    Case("zip-absolute", lambda t: good_archive(t, **{"/tmp/evil.png": PNG}),
         "upload.zip//tmp/evil.png: absolute paths are not allowed"),
    Case("zip-windows-drive", lambda t: good_archive(t, **{"C:/evil.png": PNG}),
         "upload.zip/C:/evil.png: absolute paths are not allowed"),
    Case("zip-symlink-member", archive_with_link,
         "upload.zip/link.png: symbolic links are not allowed"),
    Case("zip-bomb-ratio", lambda t: good_archive(t, **{"zeros.png": bytes(2_000_000)}),
         "upload.zip/zeros.png: compression ratio"),
    Case("zip-total-too-big", lambda t: patch_headers(good_archive(t), "a.png", {22: struct.pack("<I", 3 * 2**30)},
                                                      {24: struct.pack("<I", 3 * 2**30)}),
         "upload.zip: unpacks to "),
    Case("zip-too-many-files", lambda t: archive(t, {f"{i}.png": b"" for i in range(10_001)}, zipfile.ZIP_STORED),
         "upload.zip: has 10001 files, more than the limit of 10000"),
    Case("zip-bad-crc", lambda t: patch_data(good_archive(t, **{"x.png": PNG}), "x.png", flip_middle_byte),
         f"upload.zip/x.png: {UNPACK_FAILED} (BadZipFile: Bad CRC-32 for file 'x.png')"),
    Case("zip-bad-crc-stored", lambda t: patch_data(archive(t, {"captions.csv": GOOD_CSV, "a.png": PNG, "b.png": PNG},
                                                            zipfile.ZIP_STORED), "b.png", flip_middle_byte),
         f"upload.zip/b.png: {UNPACK_FAILED} (BadZipFile: Bad CRC-32 for file 'b.png')"),
    Case("zip-corrupt-deflate", lambda t: patch_data(good_archive(t), "a.png", lambda d: b"\xff" * len(d)),
         f"upload.zip/a.png: {UNPACK_FAILED} (error: Error -3 while decompressing data: invalid block type)"),
    Case("zip-encrypted", lambda t: patch_headers(good_archive(t), "b.png", {6: b"\x01"}, {8: b"\x01"}),
         "upload.zip/b.png: is encrypted: make the archive without a password"),
    Case("zip-unknown-compression", lambda t: patch_headers(good_archive(t), "b.png", {8: b"\x63"}, {10: b"\x63"}),
         "upload.zip/b.png: uses compression method 99, which is not supported (use deflate)"),
    Case("zip-file-and-folder", lambda t: good_archive(t, **{"d": b"x", "d/e.png": PNG}),
         "upload.zip/d: is both a file and a folder in the archive"),
    Case("zip-duplicate-member", lambda t: good_archive(t, **{"./a.png": b"not the same picture"}),
         "upload.zip/./a.png: appears twice in the archive"),
    Case("zip-member-name-300", lambda t: good_archive(t, **{"x" * 296 + ".png": PNG}),
         f"upload.zip/{'x' * 296}.png: the name '{'x' * 32}…' is 300 bytes long, more than the limit of 255"),
    Case("zip-member-dot", lambda t: good_archive(t, **{".": b"x"}), "upload.zip/.: not a file name"),
    Case("zip-lying-size", lambda t: patch_headers(good_archive(t), "a.png", {22: struct.pack("<I", 10)},
                                                   {24: struct.pack("<I", 10)}),
         f"upload.zip/a.png: {UNPACK_FAILED} (BadZipFile: Bad CRC-32 for file 'a.png')"),
    Case("zip-bad-utf8-name", lambda t: patch_headers(good_archive(t), "b.png", {7: b"\x08", 30: b"\xff"},
                                                      {9: b"\x08", 46: b"\xff"}),
         "upload.zip: not a readable .zip archive (UnicodeDecodeError"),
    Case("zip-not-a-zip", lambda t: folder(t, {"upload.zip": "just text"}, name="x") / "upload.zip",
         "upload.zip: not a readable .zip archive"),
    Case("zip-truncated", lambda t: truncated(good_archive(t)),
         "upload.zip: not a readable .zip archive"),
    Case("zip-in-zip", lambda t: archive(t, {"inner.zip": good_archive(t).read_bytes()}),
         "upload.zip: no manifest found: add captions.csv or data.jsonl at the top level"),
    Case("zip-missing-file-after-extraction", lambda t: archive(t, {"captions.csv": GOOD_CSV, "a.png": PNG}),
         "captions.csv → b.png, row 3: file not found"),
    # Manifests
    Case("no-manifest", lambda t: folder(t, {"a.png": PNG}), "data: no manifest found"),
    Case("two-manifests", lambda t: folder(t, {"a.png": PNG, "captions.csv": GOOD_CSV, "data.jsonl": "{}\n"}),
         "data: has both captions.csv and data.jsonl: keep one"),
    Case("manifest-is-a-folder", lambda t: folder(t, {"a.png": PNG, "captions.csv/x": ""}),
         "captions.csv: is a folder, not a file"),
    Case("manifest-symlink-out", lambda t: symlinked(
        folder(t, {"a.png": PNG}), "captions.csv", folder(t, {"captions.csv": GOOD_CSV}, "elsewhere") / "captions.csv"),
         "captions.csv: path escapes the dataset folder"),
    Case("manifest-symlink-loop", lambda t: symlinked(folder(t, {"a.png": PNG}), "captions.csv", "captions.csv"),
         "captions.csv: symbolic link loop"),
    Case("manifest-too-big", lambda t: with_sparse(folder(t, {"a.png": PNG}), "captions.csv", 17 * 2**20,
                                                   b"file,caption\n"),
         f"captions.csv: is {17 * 2**20} bytes, more than the limit of {16 * 2**20}"),
    Case("only-subfolder-is-a-symlink", lambda t: symlinked(folder(t, {"notes.txt": "x"}), "sub", folder(
        t, {"captions.csv": GOOD_CSV, "a.png": PNG, "b.png": PNG}, "elsewhere")),
         "data: no manifest found"),
    # CSV
    Case("csv-empty-file", lambda t: csv_set(t, ""), "captions.csv, row 1: missing column(s) file, caption"),
    Case("csv-missing-column", lambda t: csv_set(t, "file,text\na.png,x\n"),
         "captions.csv, row 1: missing column(s) caption: the header must have file,caption (found: file, text)"),
    Case("csv-header-only", lambda t: csv_set(t, "file,caption\n"), "captions.csv: has no rows"),
    Case("csv-more-fields", lambda t: csv_set(t, "file,caption\na.png,x\nb.png,y,z\n"),
         "captions.csv, row 3: has more fields than the header"),
    Case("csv-field-over-128k", lambda t: csv_set(t, "file,caption\na.png,x\nb.png," + "y" * 140_000 + "\n"),
         "captions.csv, row 3: cannot be read as CSV (field larger than field limit (131072))"),
    Case("csv-not-utf8", lambda t: csv_set(t, "file,caption\na.png,ok\nb.png,café\n".encode("latin-1")),
         "captions.csv, row 3: is not UTF-8 text (save it as UTF-8)"),
    Case("csv-utf16", lambda t: csv_set(t, GOOD_CSV.encode("utf-16")),
         "captions.csv, row 1: is not UTF-8 text (save it as UTF-8)"),
    Case("csv-too-many-rows", lambda t: csv_set(t, "file,caption\n" + "a.png,x\n" * 10_001),
         "captions.csv: has more than 10000 rows (the limit)"),
    Case("csv-empty-caption", lambda t: csv_set(t, "file,caption\na.png,\nb.png,y\n"),
         "captions.csv, row 2: empty caption"),
    Case("csv-empty-file-name", lambda t: csv_set(t, "file,caption\na.png,x\n ,y\n"),
         "captions.csv, row 3: the file name is empty"),
    Case("csv-short-row", lambda t: csv_set(t, "file,caption\na.png,x\nb.png\n"), "captions.csv, row 3: empty caption"),
    Case("csv-bad-split", lambda t: csv_set(t, "file,caption,split\na.png,x,train\nb.png,y,validation\n"),
         "captions.csv, row 3: split must be train or test, not 'validation'"),
    Case("csv-splits-mixed", lambda t: csv_set(t, "file,caption,split\na.png,x,train\nb.png,y\n"),
         "captions.csv, row 3: some rows have a split and others don't"),
    Case("csv-both-splits", lambda t: csv_set(t, "file,caption,split\na.png,x,train\na.png,y,test\n"),
         "captions.csv, row 3: a.png is in both the train and the test split"),
    Case("csv-missing-file", lambda t: csv_set(t, "file,caption\na.png,x\nnope.png,y\n"),
         "captions.csv → nope.png, row 3: file not found"),
    Case("csv-absolute-path", lambda t: csv_set(t, "file,caption\na.png,x\n/etc/hostname,y\n"),
         "captions.csv → /etc/hostname, row 3: absolute paths are not allowed"),
    Case("csv-windows-absolute", lambda t: csv_set(t, "file,caption\na.png,x\nC:\\x.png,y\n"),
         "captions.csv → C:\\x.png, row 3: absolute paths are not allowed"),
    Case("csv-dotdot", lambda t: csv_set(t, "file,caption\na.png,x\n../b.png,y\n"),
         "captions.csv → ../b.png, row 3: path escapes the dataset folder"),
    Case("csv-symlink-out", lambda t: symlinked(csv_set(t, "file,caption\na.png,x\nlink.png,y\n"), "link.png",
                                                folder(t, {"secret.png": PNG}, "outside") / "secret.png"),
         "captions.csv → link.png, row 3: path escapes the dataset folder"),
    Case("csv-symlink-loop", lambda t: symlinked(csv_set(t, "file,caption\na.png,x\nloop.png,y\n"), "loop.png",
                                                 "loop.png"),
         "captions.csv → loop.png, row 3: symbolic link loop"),
    Case("csv-folder-named-png", lambda t: csv_set(t, "file,caption\na.png,x\nd.png,y\n", **{"d.png/e.png": PNG}),
         "captions.csv → d.png, row 3: is a folder, not a file"),
    Case("csv-unsupported-type", lambda t: csv_set(t, "file,caption\na.png,x\nnotes.txt,y\n", **{"notes.txt": b"hi"}),
         "captions.csv → notes.txt, row 3: unsupported file type '.txt'"),
    Case("csv-nul-in-name", lambda t: csv_set(t, "file,caption\na.png,x\nb\0.png,y\n"),
         "captions.csv → b\0.png, row 3: the file name contains a NUL character"),
    Case("csv-name-5000", lambda t: csv_set(t, "file,caption\na.png,x\n" + "n" * 4996 + ".png,y\n"),
         "row 3: the file name is 5000 bytes long, more than the limit of 1024"),
    Case("csv-name-part-300", lambda t: csv_set(t, "file,caption\na.png,x\nsub/" + "n" * 296 + ".png,y\n"),
         "row 3: the name 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn…' is 300 bytes long, more than the limit of 255"),
    # Images
    Case("image-zero-bytes", lambda t: csv_set(t, GOOD_CSV, **{"b.png": b""}),
         "captions.csv → b.png, row 3: unreadable image (not a JPEG, PNG, WebP or BMP file)"),
    Case("image-truncated-jpeg", lambda t: csv_set(t, WITH_B_JPG, **{"b.jpg": noisy_jpeg()[:1500]}),
         "captions.csv → b.jpg, row 3: unreadable image (OSError: image file is truncated"),
    Case("image-truncated-progressive-jpeg",
         lambda t: csv_set(t, WITH_B_JPG, **{"b.jpg": noisy_jpeg(progressive=True)[:1500]}),
         "captions.csv → b.jpg, row 3: unreadable image (OSError: image file is truncated"),
    Case("image-truncated-png", lambda t: csv_set(t, GOOD_CSV, **{"b.png": picture((64, 64))[:60]}),
         "captions.csv → b.png, row 3: unreadable image"),
    Case("image-text-named-png", lambda t: csv_set(t, GOOD_CSV, **{"b.png": b"hello, I am text"}),
         "captions.csv → b.png, row 3: unreadable image (not a JPEG, PNG, WebP or BMP file)"),
    Case("image-gif-named-png", lambda t: csv_set(t, GOOD_CSV, **{"b.png": picture(format="GIF")}),
         "captions.csv → b.png, row 3: unreadable image (not a JPEG, PNG, WebP or BMP file)"),
    Case("image-tiff-named-jpg", lambda t: csv_set(t, WITH_B_JPG, **{"b.jpg": picture(format="TIFF")}),
         "captions.csv → b.jpg, row 3: unreadable image (not a JPEG, PNG, WebP or BMP file)"),
    Case("image-too-many-pixels", lambda t: csv_set(t, GOOD_CSV, **{"b.png": png_claiming(8000, 8000)}),
         "captions.csv → b.png, row 3: image has 64000000 pixels (8000×8000), more than the limit of 40000000"),
    Case("image-decompression-bomb", lambda t: csv_set(t, GOOD_CSV, **{"b.png": png_claiming(20_000, 20_000)}),
         "captions.csv → b.png, row 3: image has too many pixels (limit 40000000)"),
    Case("image-file-too-big", lambda t: with_sparse(csv_set(t, GOOD_CSV), "b.png", 65 * 2**20, PNG),
         f"captions.csv → b.png, row 3: file is {65 * 2**20} bytes, more than the limit of {64 * 2**20}"),
    # JSON lines
    Case("jsonl-invalid", lambda t: jsonl_set(t, {"image": "a.png", "caption": "x"}, '{"image": "b.png", caption: 1}'),
         "data.jsonl, row 2: not valid JSON (Expecting property name enclosed in double quotes)"),
    Case("jsonl-not-object", lambda t: jsonl_set(t, {"image": "a.png", "caption": "x"}, '["b.png"]'),
         "data.jsonl, row 2: each line must be a JSON object"),
    Case("jsonl-nested-100000", lambda t: jsonl_set(t, {"image": "a.png", "caption": "x"}, "[" * 100_000),
         "data.jsonl, row 2: not valid JSON (nested too deeply)"),
    Case("jsonl-5000-digits", lambda t: jsonl_set(t, {"image": "a.png", "caption": "x"},
                                                  '{"image": "b.png", "caption": "y", "n": ' + "9" * 5000 + "}"),
         "data.jsonl, row 2: not valid JSON (a number has too many digits)"),
    Case("jsonl-split-number", lambda t: jsonl_set(t, {"image": "a.png", "caption": "x", "split": 5}),
         "data.jsonl, row 1: split must be train or test, not '5'"),
    Case("jsonl-caption-list", lambda t: jsonl_set(t, {"image": "a.png", "caption": "x"},
                                                   {"image": "b.png", "caption": ["y"]}),
         "data.jsonl, row 2: 'caption' must be text, not list"),
    Case("jsonl-answer-object", lambda t: jsonl_set(t, {"image": "a.png", "question": "what?", "answer": {}}),
         "data.jsonl, row 1: 'answer' must be a non-empty string or list of strings"),
    Case("jsonl-question-without-answer", lambda t: jsonl_set(t, {"image": "a.png", "question": "what?"}),
         "data.jsonl, row 1: 'answer' must be a non-empty string or list of strings"),
    Case("jsonl-answer-without-question", lambda t: jsonl_set(t, {"image": "a.png", "answer": "red"}),
         "data.jsonl, row 1: missing question"),
    Case("jsonl-question-number", lambda t: jsonl_set(t, {"image": "a.png", "question": 7, "answer": "x"}),
         "data.jsonl, row 1: 'question' must be text, not int"),
    Case("jsonl-no-caption-or-question", lambda t: jsonl_set(t, {"image": "a.png"}),
         "data.jsonl, row 1: needs a 'caption', or a 'question' with an 'answer'"),
    Case("jsonl-image-number", lambda t: jsonl_set(t, {"image": 5, "caption": "x"}),
         "data.jsonl, row 1: 'image' must be a file name, not int"),
    Case("jsonl-image-and-video", lambda t: jsonl_set(t, {"image": "a.png", "video": "b.mp4", "caption": "x"}),
         "data.jsonl, row 1: each row needs exactly one of 'image' or 'video'"),
    Case("jsonl-nul-in-name", lambda t: jsonl_set(t, {"image": "a\0.png", "caption": "x"}),
         "data.jsonl → a\0.png, row 1: the file name contains a NUL character"),
    Case("jsonl-name-5000", lambda t: jsonl_set(t, {"image": "n" * 4996 + ".png", "caption": "x"}),
         "row 1: the file name is 5000 bytes long, more than the limit of 1024"),
    Case("jsonl-lone-surrogate-name", lambda t: jsonl_set(t, '{"image": "a\\ud800.png", "caption": "x"}'),
         "row 1: the file name is not valid Unicode text"),
    Case("jsonl-lone-surrogate-split", lambda t: jsonl_set(t, '{"image": "a.png", "caption": "x", "split": "\\ud800"}'),
         "data.jsonl, row 1: split must be train or test, not '\\ud800'"),
    Case("jsonl-lone-surrogate-caption", lambda t: jsonl_set(t, '{"image": "a.png", "caption": "x\\ud800"}'),
         "data.jsonl, row 1: 'caption' is not valid Unicode text"),
    Case("jsonl-image-is-a-video", lambda t: videos(t, jsonl({"image": "v1.mp4", "caption": "x"})),
         "data.jsonl, row 1: 'v1.mp4' is listed as an image but is a video file"),
    # Videos
    Case("video-mixed-with-images", lambda t: videos(t, jsonl({"video": "v1.mp4", "caption": "x"},
                                                              {"image": "a.png", "caption": "y"}), **{"a.png": PNG}),
         "data.jsonl: mixes images and videos: make one dataset of each"),
    Case("video-broken", lambda t: videos(t, "file,caption\nv1.mp4,x\nbad.mp4,y\n",
                                          **{"bad.mp4": b"\x00\x00\x00\x18ftypmp42 not a video"}),
         "captions.csv → bad.mp4, row 3: unreadable video"),
    Case("video-zero-bytes", lambda t: videos(t, "file,caption\nv1.mp4,x\nempty.webm,y\n", **{"empty.webm": b""}),
         "captions.csv → empty.webm, row 3: unreadable video"),
    Case("video-truncated", lambda t: videos(t, "file,caption\nv1.mp4,x\ncut.mp4,y\n",
                                             **{"cut.mp4": truncated(clip(t / "whole.mp4", frames=12)).read_bytes()}),
         "captions.csv → cut.mp4, row 3: unreadable video"),
    Case("video-too-long", lambda t: with_long_clip(videos(t, "file,caption\nv1.mp4,x\nlong.mp4,y\n")),
         "captions.csv → long.mp4, row 3: video is 310 s long, more than the limit of 300 s"),
]


def tree(root: Path) -> dict[Path, str]:
    """Every path under `root` with a hash of its content (symbolic links by their target, not followed)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[path] = "link:" + os.readlink(path)
        elif path.is_file():
            with open(path, "rb") as source:
                found[path] = hashlib.file_digest(source, "sha256").hexdigest()
        else:
            found[path] = "folder"
    return found


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except BaseException as error:   # the CLI must answer, not raise
        pytest.fail(f"main() raised {type(error).__name__}: {error}")
    out, err = capfd.readouterr()
    return code, out, err


def test_the_corpus_is_large_and_named_uniquely():
    assert len(MALFORMED) >= 60 and len({case.id for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("case", MALFORMED, ids=[case.id for case in MALFORMED])
def test_malformed_dataset_is_one_clear_error(case, tmp_path, capfd):
    source = case.build(tmp_path)
    before = tree(tmp_path)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli([*TUNE, "--data", str(source), "--out", str(out)], capfd)
    assert code == 2, stdout + stderr
    lines = stdout.splitlines()
    assert len(lines) == 1 and list(json.loads(lines[0])) == ["error"], stdout
    error = json.loads(lines[0])["error"]
    assert case.expected in error and error.encode("utf-8"), error   # shown as valid Unicode, whatever came in
    assert "Traceback" not in stderr, stderr
    after = tree(tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before     # the upload is untouched
    assert all(p.is_relative_to(out) for p in set(after) - set(before))  # and nothing is written elsewhere


@pytest.mark.parametrize("case", [case for case in MALFORMED if case.id in ("zip-bad-crc", "jsonl-nested-100000")],
                         ids=lambda case: case.id)
def test_the_real_cli_exits_2_without_a_traceback(case, tmp_path):
    source = case.build(tmp_path)
    done = subprocess.run([sys.executable, "-m", "core", *TUNE, "--data", str(source), "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert case.expected in json.loads(done.stdout.splitlines()[-1])["error"]


# --- Damaged archives leave nothing behind ---------------------------------------------------

def test_a_damaged_archive_leaves_no_extracted_files_and_only_removes_what_it_made(tmp_path):
    damaged = patch_data(good_archive(tmp_path, **{"x.png": PNG}), "x.png", flip_middle_byte)
    with pytest.raises(DatasetError):
        read_dataset(damaged, tmp_path / "new" / "work")
    assert not (tmp_path / "new").exists()           # the folders made for the extraction went too
    work = tmp_path / "work"
    (work / "keep").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError):
        read_dataset(damaged, work)
    assert sorted(p.name for p in work.iterdir()) == ["keep", "notes.txt"]


def test_a_refused_dataset_after_extraction_is_removed_too(tmp_path):
    with pytest.raises(DatasetError, match="b.png, row 3: file not found"):
        read_dataset(archive(tmp_path, {"captions.csv": GOOD_CSV, "a.png": PNG}), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_file_broken_after_validation_is_named_when_loaded(tmp_path):
    root = folder(tmp_path, {"a.jpg": noisy_jpeg(), "captions.csv": "file,caption\na.jpg,x\n"})
    dataset = read_dataset(root, tmp_path / "w")
    truncated(root / "a.jpg")
    with pytest.raises(DatasetError, match=r"- a.jpg: unreadable image \(OSError: image file is truncated"):
        load_media(dataset.path(dataset.items[0]), "image", lambda image: image)


# --- Odd but valid datasets read correctly ---------------------------------------------------

def captions(dataset) -> dict[str, list[str]]:
    return {item.media: item.captions for item in dataset.items}


def test_bom_crlf_and_quoted_fields(tmp_path):
    manifest = '\ufefffile,caption\r\na.png,"a red, square"\r\n"b c.png","two\r\nlines"\r\n\r\n'
    root = folder(tmp_path, {"a.png": PNG, "b c.png": PNG, "captions.csv": manifest})
    assert captions(read_dataset(root, tmp_path / "w")) == {"a.png": ["a red, square"], "b c.png": ["two\r\nlines"]}
    # A caption holding U+2028 (a line separator to Python, not to JSON) stays one row.
    rows = '\ufeff{"image": "a.png", "caption": "x\u2028y"}\r\n\r\n{"image": "b c.png", "caption": "z"}\r\n'
    dataset = read_dataset(folder(tmp_path, {"a.png": PNG, "b c.png": PNG, "data.jsonl": rows}, "j"), tmp_path / "w")
    assert captions(dataset) == {"a.png": ["x\u2028y"], "b c.png": ["z"]}
    assert [item.rows for item in dataset.items] == [[1], [3]]


@pytest.mark.parametrize("name, content", [
    ("cmyk.jpg", picture(mode="CMYK", colour=(0, 200, 200, 0), format="JPEG")),
    ("progressive.jpg", noisy_jpeg(progressive=True)),
    ("palette.png", picture(mode="P", colour=3, transparency=3)),
    ("grey16.png", picture(mode="I;16", colour=40_000)),
    ("grey-alpha.png", picture(mode="LA", colour=(90, 128))),
    ("bilevel.bmp", picture(mode="1", colour=1, format="BMP")),
    ("photo.webp", picture(format="WEBP")),
    ("rgba.png", picture(mode="RGBA", colour=(1, 2, 3, 0))),
])
def test_unusual_image_modes_are_read_as_rgb(tmp_path, name, content):
    root = folder(tmp_path, {name: content, "captions.csv": f"file,caption\n{name},x\n"})
    dataset = read_dataset(root, tmp_path / "w")
    assert load_media(dataset.path(dataset.items[0]), "image", lambda image: image).mode == "RGB"


def test_videos_listed_in_captions_csv_are_videos(tmp_path):
    manifest = "file,caption\nv1.mp4,a blue clip\nv2.MP4,another\nv3.mp4,a third\n"
    root = videos(tmp_path, manifest, names=("v1.mp4", "v2.MP4", "v3.mp4"))
    dataset = read_dataset(root, tmp_path / "w")
    assert [(item.media, item.kind) for item in dataset.items] == [("v1.mp4", "video"), ("v2.MP4", "video"),
                                                                   ("v3.mp4", "video")]
    frames = load_media(dataset.path(dataset.items[0]), "video", lambda frame: torch.from_numpy(np.array(frame)), 2)
    assert frames.shape == (2, 32, 32, 3)
    (root / "a.png").write_bytes(PNG)
    (root / "captions.csv").write_text("file,caption\nv1.mp4,x\na.png,y\n")
    with pytest.raises(DatasetError, match="mixes images and videos"):
        read_dataset(root, tmp_path / "w")


def test_unicode_names_nested_folders_and_macos_junk_in_a_zip(tmp_path):
    upload = archive(tmp_path, {
        "Mes données/captions.csv":
            "file,caption\nphotos/café.png,un café\n日本/猫.png,a cat\n./photos/café.png,again\n",
        "Mes données/photos/": b"", "Mes données/photos/café.png": PNG, "Mes données/日本/猫.png": JPEG,
        "Mes données/.DS_Store": b"\0\0\0\1Bud1", "__MACOSX/Mes données/._café.png": b"\0\5\26\7junk"})
    dataset = read_dataset(upload, tmp_path / "run")
    assert captions(dataset) == {"photos/café.png": ["un café", "again"], "日本/猫.png": ["a cat"]}
    assert dataset.root == (tmp_path / "run/dataset/Mes données").resolve()


def test_a_clean_odd_dataset_tunes_end_to_end_through_the_cli(tmp_path, capfd):
    names = ["cmyk.jpg", "palette.png", "été.png", "b c.png", "grey16.png"]
    contents = [picture(mode="CMYK", colour=(0, 200, 200, 0), format="JPEG"),
                picture(mode="P", colour=3, transparency=3), picture(colour=(20, 200, 20)),
                picture(colour=(20, 20, 200)), picture(mode="I;16", colour=40_000)]
    manifest = "\ufefffile,caption\r\n" + "".join(f'"{n}",picture {i}\r\n' for i, n in enumerate(names))
    upload = archive(tmp_path, {"set/captions.csv": manifest, **{f"set/{n}": c for n, c in zip(names, contents)}})
    code, stdout, stderr = run_cli([*TUNE, "--data", str(upload), "--out", str(tmp_path / "run"),
                                    "--epochs", "1", "--shots", "2"], capfd)
    assert code == 0, stdout + stderr
    result = json.loads(stdout.splitlines()[-1])
    assert result["method"] == "lora" and set(result["tuned"]) == set(result["zero_shot"])
