"""Files -> validated cache -> folds. Training code reads only the cache.

Public entry points: ``DataConfig`` + ``open_dataset`` (any layout or the embedded dataset),
``make_folds`` / ``folds_for_cache``, and the ``pcam-data`` command (``data_pipeline.cli``).
The names below are imported on first use (PEP 562), so light submodules (``version``,
``constants``) load without numpy, pandas or scikit-learn: a command's ``--help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Cache": "cache",
    "build_cache": "cache",
    "load_cache": "cache",
    "DataConfig": "dataset",
    "open_dataset": "dataset",
    "folds_for_cache": "folds",
    "make_folds": "folds",
    "DataError": "problems",
    "Problem": "problems",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"data_pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
