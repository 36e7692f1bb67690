"""``--version`` for every command (one definition)."""

from __future__ import annotations

import argparse
import importlib.metadata


def add_version(ap: argparse.ArgumentParser) -> None:
    """Add ``--version``: the installed pcam-search version, then exit 0."""
    version = importlib.metadata.version("pcam-search")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version}")
