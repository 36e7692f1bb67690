"""Validation problems found in a dataset, and the error raised when they stop a build.

Every reader and the cache builder report what is wrong with the source as `Problem` rows;
nothing is dropped silently. By default any problem stops the build (`DataError`); with
``skip_bad`` the offending rows are left out and the report is written beside the cache.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# The kinds a reader can report. Fatal kinds cannot be fixed by skipping rows (the source as a
# whole is unusable), so they stop a build even with skip_bad.
KINDS = {
    "bad_columns": "CSV file lacks the expected columns or cannot be parsed",
    "missing_source": "a required file of the layout is missing",
    "bad_array": "an HDF5 array has the wrong key, shape or dtype",
    "missing_file": "id listed in a CSV but no image file for it",
    "unlabelled_file": "image file with no row in the CSV",
    "bad_name": "image file name is not valid UTF-8 (no id can hold it)",
    "unreadable": "image file cannot be decoded (truncated or corrupt)",
    "bad_shape": "image is not 96x96 RGB",
    "bad_label": "label is not 0 or 1",
    "duplicate_id": "the same id appears more than once",
    "duplicate_image": "exact-duplicate image (same pixels) of another id",
    "one_class": "every labelled patch has the same label (ROC AUC needs both classes)",
}
FATAL_KINDS = frozenset({"bad_columns", "missing_source", "bad_array", "one_class"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the source. ``id`` is empty for file-level problems."""

    kind: str
    id: str = ""
    path: str = ""
    detail: str = ""
    split: str = ""
    action: str = "error"  # "error" (stops the build), "skipped" or "kept" under skip_bad

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown problem kind {self.kind!r}; expected one of {sorted(KINDS)}"
            )

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS

    def where(self) -> str:
        """The id, else the path: what a user looks up to fix it."""
        return self.id or self.path


def summarize(problems: Iterable[Problem], source: str | Path, first: int = 5) -> str:
    """Human-readable summary: the count per kind and the first offending ids/paths of each."""
    problems = list(problems)
    if not problems:
        return f"{source}: no problems found"
    by_kind: dict[str, list[Problem]] = {}
    for p in problems:
        by_kind.setdefault(p.kind, []).append(p)
    lines = [f"{source}: {len(problems)} problem(s) found"]
    for kind, items in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(p.where() for p in items[:first])
        more = f", ... (+{len(items) - first} more)" if len(items) > first else ""
        lines.append(f"  {len(items):>7} {kind} ({KINDS[kind]}): {shown}{more}")
        detail = items[0].detail
        if detail:
            lines.append(f"          e.g. {items[0].where()}: {detail}")
    return "\n".join(lines)


def counts(problems: Iterable[Problem]) -> dict[str, int]:
    """Problem count per kind."""
    return dict(Counter(p.kind for p in problems))


def to_csv_text(problems: Iterable[Problem]) -> str:
    """The report as CSV text (one row per problem, columns = Problem fields)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Problem)])
    writer.writeheader()
    for p in problems:
        writer.writerow(asdict(p))
    return buf.getvalue()


class DataError(Exception):
    """The dataset cannot be used as it is. ``problems`` lists why; the message summarises it."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []
