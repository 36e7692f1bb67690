"""What every command's parser shares: ``--version`` and plain-text descriptions."""

from __future__ import annotations

import argparse
import importlib.metadata


def add_version(ap: argparse.ArgumentParser) -> None:
    """Add ``--version``: the installed pcam-search version, then exit 0."""
    version = importlib.metadata.version("pcam-search")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version}")


def help_text(doc: str) -> str:
    """A docstring as a terminal shows it: without reST's double backticks."""
    return doc.replace("``", "")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" where there is a real default: not on required, computed (None)
    or on/off flags, whose "(default: None)" or "(default: False)" says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action) or ""
