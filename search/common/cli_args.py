"""Command-line arguments of the commands that open a study, defined once. Standard library
and ``search.common.defaults`` only: each command's ``--help`` answers without torch, Ray or
Optuna."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported when an error is printed, not for --help
    from rich.console import Console

from search.common.defaults import DEFAULT_STUDIES_DIR, DEFAULT_STUDY


def add_study_args(ap: argparse.ArgumentParser) -> None:
    """``--study`` (``--study-name``, Optuna's spelling), ``--storage``, ``--studies-dir``."""
    ap.add_argument(
        "--study",
        "--study-name",
        dest="study",
        default=DEFAULT_STUDY,
        help="study name (default: %(default)s)",
    )
    ap.add_argument(
        "--storage",
        default="",
        help="sqlite:///PATH or postgresql://user@host/db (default: sqlite:///studies/pcam.db)",
    )
    ap.add_argument(
        "--studies-dir",
        type=Path,
        default=DEFAULT_STUDIES_DIR,
        help="SQLite file and per-study outputs (default: ./studies)",
    )


def print_error(console: Console, message: str, code: int = 2) -> int:
    """Say ``message`` on ``console`` (a rich Console on stderr) as the one-line error of a
    command, escaped (paths and ids are not markup); returns the exit ``code``."""
    from rich.markup import escape

    console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    return code


def study_flags(study: str, studies_dir: Path, storage: str) -> list[str]:
    """The flags that reach this study from any folder: its name, the absolute studies folder
    and the storage when it is not the default (its password masked: put it back, or use a
    .pgpass file)."""
    from search.common.study import safe_url  # sqlalchemy: only when a command prints this

    flags = ["--study", study, "--studies-dir", str(Path(studies_dir).resolve())]
    return flags + (["--storage", safe_url(storage)] if storage else [])
