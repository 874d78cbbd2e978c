"""Problems with a user's dataset, each naming the file and row it is about."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    row: Optional[int] = None

    def __post_init__(self):
        # A manifest can smuggle in text no encoder takes (a lone surrogate from a JSON "\ud800"):
        # show it escaped, so printing or serialising the report never fails.
        for name in ("file", "message"):
            text = getattr(self, name)
            object.__setattr__(self, name, text.encode("utf-8", "backslashreplace").decode("utf-8"))

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" if self.row is not None else self.file
        return f"{where}: {self.message}"


class DatasetError(ValueError):
    """The dataset cannot be used; `problems` lists every issue found, for a validation report."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        shown = "\n".join(f"- {p}" for p in self.problems[:20])
        more = f"\n- … and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"the dataset has {len(self.problems)} problem(s):\n{shown}{more}")


def describe(error: BaseException) -> str:
    """A library's exception as one short line for a Problem (decoders' messages can run to pages)."""
    first_line = next(iter(str(error).splitlines()), "")
    return f"{type(error).__name__}: {first_line[:200]}" if first_line else type(error).__name__
