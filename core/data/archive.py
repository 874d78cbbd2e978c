"""Safe extraction of an uploaded .zip: no path escapes, no links, no bombs, no damaged members."""
from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

from core.data.errors import DatasetError, Problem, describe
from core.data.limits import Limits
from core.data.names import name_problem

SUPPORTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def extract_zip(archive: Path, destination: Path, limits: Limits) -> Path:
    """Extract `archive` into `destination` (created here; it must not exist) after checking every member.

    On a damaged member the extraction stops with a DatasetError; removing what was written
    is the caller's, which knows what it created."""
    name = archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except Exception as error:  # zipfile reports a damaged directory through many exception types
        raise DatasetError([Problem(name, f"not a readable .zip archive ({describe(error)})")]) from error
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        problems = []
        if len(members) > limits.max_files:
            problems.append(Problem(name, f"has {len(members)} files, more than the limit of {limits.max_files}"))
        total = sum(m.file_size for m in members)
        if total > limits.max_total_bytes:
            problems.append(Problem(name, f"unpacks to {total} bytes, more than the limit of {limits.max_total_bytes}"))
        problems += [Problem(f"{name}/{m.filename}", problem) for m in members
                     if (problem := _member_problem(m, limits))]
        problems += _clashes(name, members)
        if problems:
            raise DatasetError(problems)
        destination.mkdir(parents=True)
        for m in members:
            target = destination.joinpath(*_parts(m))
            target.parent.mkdir(parents=True, exist_ok=True)
            if problem := _copy_member(zf, m, target):
                raise DatasetError([Problem(f"{name}/{m.filename}", problem)])
    return destination


def _parts(member: zipfile.ZipInfo) -> tuple[str, ...]:
    """The member's path inside the archive, as folder and file names (`a/./b` and `a//b` are `a/b`)."""
    return PurePosixPath(member.filename.replace("\\", "/")).parts


def _member_problem(member: zipfile.ZipInfo, limits: Limits) -> Optional[str]:
    if problem := name_problem(member.filename, limits):
        return problem
    if ".." in _parts(member):
        return "path escapes the dataset folder"
    if stat.S_ISLNK(member.external_attr >> 16):
        return "symbolic links are not allowed"
    if member.flag_bits & 0x1:
        return "is encrypted: make the archive without a password"
    if member.compress_type not in SUPPORTED_COMPRESSION:
        return f"uses compression method {member.compress_type}, which is not supported (use deflate)"
    if member.compress_size and member.file_size / member.compress_size > limits.max_compression_ratio:
        return (f"compression ratio {member.file_size / member.compress_size:.0f}:1 exceeds the "
                f"limit of {limits.max_compression_ratio:.0f}:1 (archive bomb?)")
    return None


def _clashes(name: str, members: list[zipfile.ZipInfo]) -> list[Problem]:
    """Members that would land on the same path, or on a folder another member needs."""
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()
    problems = []
    for m in members:
        parts = _parts(m)
        if parts in files:
            problems.append(Problem(f"{name}/{m.filename}", "appears twice in the archive"))
        files.add(parts)
        folders.update(parts[:end] for end in range(1, len(parts)))
    problems += [Problem(f"{name}/{'/'.join(parts)}", "is both a file and a folder in the archive")
                 for parts in sorted(files & folders)]
    return problems


def _copy_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path) -> Optional[str]:
    """Write one member to `target`; what went wrong, or None."""
    written = 0
    try:
        with zf.open(member) as source, open(target, "wb") as sink:
            # The header's sizes can lie: count what actually comes out.
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > member.file_size:
                    return "unpacks to more than its header says"
                sink.write(chunk)
    except Exception as error:  # damage surfaces as zipfile, zlib, bz2 or lzma errors; a full disk as OSError
        return f"cannot be unpacked ({describe(error)})"
    return None
