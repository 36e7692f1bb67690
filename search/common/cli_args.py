"""Command-line arguments of the commands that open a study, defined once. Standard library
and ``search.common.defaults`` only: each command's ``--help`` answers without torch, Ray or
Optuna."""

from __future__ import annotations

import argparse
from pathlib import Path

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
