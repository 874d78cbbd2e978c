"""Problems with a user's dataset, each naming the file and row it is about."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    row: Optional[int] = None

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
