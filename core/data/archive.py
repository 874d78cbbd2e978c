"""Safe extraction of an uploaded .zip: no path escapes, no links, no bombs."""
from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from core.data.errors import DatasetError, Problem
from core.data.limits import Limits


def extract_zip(archive: Path, destination: Path, limits: Limits) -> Path:
    """Extract `archive` into `destination` (created, must be empty) after checking every member."""
    name = archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError([Problem(name, f"not a readable .zip archive ({error})")]) from error
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        problems = []
        if len(members) > limits.max_files:
            problems.append(Problem(name, f"has {len(members)} files, more than the limit of {limits.max_files}"))
        total = sum(m.file_size for m in members)
        if total > limits.max_total_bytes:
            problems.append(Problem(name, f"unpacks to {total} bytes, more than the limit of {limits.max_total_bytes}"))
        for m in members:
            path = PurePosixPath(m.filename.replace("\\", "/"))
            if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
                problems.append(Problem(f"{name}/{m.filename}", "path escapes the dataset folder"))
            elif stat.S_ISLNK(m.external_attr >> 16):
                problems.append(Problem(f"{name}/{m.filename}", "symbolic links are not allowed"))
            elif m.compress_size and m.file_size / m.compress_size > limits.max_compression_ratio:
                problems.append(Problem(f"{name}/{m.filename}",
                                        f"compression ratio {m.file_size / m.compress_size:.0f}:1 exceeds the "
                                        f"limit of {limits.max_compression_ratio:.0f}:1 (archive bomb?)"))
        if problems:
            raise DatasetError(problems)
        destination.mkdir(parents=True, exist_ok=True)
        root = destination.resolve()
        for m in members:
            target = (root / m.filename.replace("\\", "/")).resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with zf.open(m) as source, open(target, "wb") as sink:
                # The header's sizes can lie: count what actually comes out.
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > m.file_size:
                        raise DatasetError([Problem(f"{name}/{m.filename}", "unpacks to more than its header says")])
                    sink.write(chunk)
    return destination
