"""One entry point for every command: a data config in, a loaded cache out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.cache import Cache, cache_root_dir, open_cache
from data_pipeline.synth import SynthConfig, ensure_embedded


@dataclass(frozen=True)
class DataConfig:
    """Where the patches come from. ``data=None`` means the embedded synthetic dataset."""

    data: Path | None = None  # Kaggle or PCam folder; None = embedded dataset
    cache_dir: Path | None = None  # cache root; None = $PCAM_CACHE_DIR or ~/.cache/pcam-search
    skip_bad: bool = False  # build without bad rows (listed in report.csv) instead of stopping
    workers: int | None = None  # decode processes; None = all CPUs available
    embedded: SynthConfig = field(default_factory=SynthConfig)  # used when data is None

    @property
    def cache_root(self) -> Path:
        return cache_root_dir(self.cache_dir)

    def source(self) -> Path:
        """The folder read: ``data``, or the embedded dataset (generated on first use)."""
        if self.data is not None:
            return Path(self.data)
        return ensure_embedded(self.cache_root / "embedded", self.embedded)


def open_dataset(cfg: DataConfig, progress: bool = True) -> Cache:
    """Build the cache for ``cfg`` if needed (validating the source) and load it."""
    return open_cache(cfg.source(), cfg.cache_root, cfg.skip_bad, cfg.workers, progress)
