"""Command-line arguments every command spells the same way, defined once. No third-party
imports: each command's ``--help`` answers without torch, Ray or Optuna."""

from __future__ import annotations

import argparse
from pathlib import Path

# Exit codes of every command
EXIT_OK = 0
EXIT_FAILED = 1  # the work ran and produced nothing usable (e.g. no trial completed)
EXIT_BAD_INPUT = 2  # a bad file, id, value or folder, named in the message; nothing written
EXIT_INTERRUPTED = 130  # Ctrl-C; running the same command again continues

CACHE_DIR_HELP = "dataset cache root (default: $PCAM_CACHE_DIR or ~/.cache/pcam-search)"


def add_cache_dir(ap: argparse.ArgumentParser) -> None:
    """``--cache-dir``: where dataset caches live."""
    ap.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)


def add_no_progress(ap: argparse.ArgumentParser, what: str = "no progress bars") -> None:
    """``--no-progress`` (``--quiet`` as an alias): plain output for logs and CI."""
    ap.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help=what)
