"""Files -> validated cache -> folds. Training code reads only the cache.

Public entry points: ``DataConfig`` + ``open_dataset`` (any layout or the embedded dataset),
``make_folds`` / ``folds_for_cache``, and the ``pcam-data`` command (``data_pipeline.cli``).
"""

from data_pipeline.cache import Cache, build_cache, load_cache
from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.folds import folds_for_cache, make_folds
from data_pipeline.problems import DataError, Problem

__all__ = [
    "Cache",
    "DataConfig",
    "DataError",
    "Problem",
    "build_cache",
    "folds_for_cache",
    "load_cache",
    "make_folds",
    "open_dataset",
]
