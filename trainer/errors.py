"""Errors about input data that a person has to fix: each problem names its file and line.

Data steps collect every problem before failing, so one run shows the user all that is wrong
(not the first thing only); `DataError` carries that list and prints the first few.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]

# How many problems the exception message spells out; the rest are counted.
SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data. `line` is 1-based; None when the problem is not about a line."""

    file: str
    line: int | None
    message: str
    severity: Severity = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    @property
    def where(self) -> str:
        if not self.file:
            return ""
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def __str__(self) -> str:
        where = self.where
        return f"{where}: {self.message}" if where else self.message

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "message": self.message}


def parse_source(source: str) -> tuple[str, int | None]:
    """Split a manifest `source` ("file:line") back into its parts; URLs keep their own colons."""
    file, sep, line = source.rpartition(":")
    if sep and line.isdigit():
        return file, int(line)
    return source, None


class DataError(ValueError):
    """Input data that cannot be used. `problems` holds every problem found, errors first."""

    def __init__(self, problems: Iterable[Problem], context: str = "bad input data") -> None:
        self.problems: list[Problem] = sorted(problems, key=lambda p: not p.is_error)
        self.context = context
        super().__init__(self._format())

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    def _format(self) -> str:
        n = len(self.problems)
        head = f"{self.context}: {n} problem{'s' if n != 1 else ''}"
        shown = [str(p) for p in self.problems[:SHOWN_PROBLEMS]]
        more = [f"... and {n - SHOWN_PROBLEMS} more"] if n > SHOWN_PROBLEMS else []
        return "\n".join([head, *shown, *more])
