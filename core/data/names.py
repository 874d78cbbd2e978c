"""What a file name in a dataset (a manifest row or an archive member) may look like."""
from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Optional

from core.data.limits import Limits


def name_problem(name: str, limits: Limits) -> Optional[str]:
    """What is wrong with `name` as a path relative to the dataset folder, or None.

    Checked on the text alone, before the file system sees it, so that no name can make
    the file system itself fail (a NUL byte, a name too long) or point outside the folder."""
    if "\0" in name:
        return "the file name contains a NUL character"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:   # a lone surrogate, e.g. from a JSON \ud800 escape
        return "the file name is not valid Unicode text"
    if size > limits.max_path_bytes:
        return f"the file name is {size} bytes long, more than the limit of {limits.max_path_bytes}"
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive:
        return "absolute paths are not allowed: name files relative to the dataset folder"
    if not posix.parts:
        return "not a file name"
    longest = max(posix.parts, key=lambda part: len(part.encode("utf-8")))
    if len(longest.encode("utf-8")) > limits.max_name_bytes:
        return (f"the name '{longest[:32]}…' is {len(longest.encode('utf-8'))} bytes long, "
                f"more than the limit of {limits.max_name_bytes}")
    return None
