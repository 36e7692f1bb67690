"""Rebuild the Kaggle slide map (``patch_id_wsi.csv``) from the PCam release.

The Kaggle competition's patches are PCam patches, and PCam's ``*_meta.csv`` files carry the
``wsi`` (slide) of every patch, but the Kaggle zip ships no slide map. Both caches already hash
every image's pixels, so a Kaggle id gets the slide of the PCam patch with the same pixel hash.

``pcam-data slide-map KAGGLE_DIR PCAM_DIR`` writes ``KAGGLE_DIR/patch_id_wsi.csv`` (id,wsi)
atomically and reports its coverage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline import cache as cache_mod
from data_pipeline.atomic import atomic_path
from data_pipeline.problems import DataError

SLIDE_MAP_CSV = "patch_id_wsi.csv"


def match_slides(kaggle: pd.DataFrame, pcam: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(id, wsi) for every Kaggle row whose pixel hash is a PCam patch with a slide, and the
    number of hashes left out as ambiguous (the same pixels on two slides). ``kaggle`` needs
    columns id, hash; ``pcam`` hash, slide. Pure."""
    known = pcam.loc[pcam["slide"].astype(str) != "", ["hash", "slide"]].drop_duplicates()
    per_hash = known.groupby("hash")["slide"].nunique()
    ambiguous = set(per_hash.index[per_hash > 1])
    known = known[~known["hash"].isin(ambiguous)]
    out = kaggle[["id", "hash"]].merge(known, on="hash", how="inner")
    out = out.rename(columns={"slide": "wsi"})[["id", "wsi"]].drop_duplicates("id")
    return out.reset_index(drop=True), len(ambiguous)


@dataclass(frozen=True)
class SlideMapResult:
    path: Path
    mapped_train: int
    train: int
    mapped_test: int
    test: int
    ambiguous: int

    @property
    def coverage(self) -> float:
        return self.mapped_train / self.train if self.train else 0.0


def build_slide_map(
    kaggle_dir: Path,
    pcam_dir: Path,
    cache_root: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> SlideMapResult:
    """Match the Kaggle folder's patches to PCam's by pixel hash and write the slide map."""
    kaggle_dir, pcam_dir = Path(kaggle_dir), Path(pcam_dir)
    out = kaggle_dir / SLIDE_MAP_CSV
    if out.exists() and not force:  # before any work
        raise DataError(f"{out} exists; pass --force to replace it")
    for d, layout in ((kaggle_dir, "kaggle"), (pcam_dir, "pcam")):
        if cache_mod.detect_layout(d) != layout:
            raise DataError(f"{d}: not a {layout} folder (the order is KAGGLE_DIR PCAM_DIR)")
    # skip_bad: a few unreadable files must not stop the matching of all the others
    kc = cache_mod.open_cache(kaggle_dir, cache_root, True, workers, progress)
    pc = cache_mod.open_cache(pcam_dir, cache_root, True, workers, progress)
    mapping, ambiguous = match_slides(kc.index, pc.index)
    with atomic_path(out) as tmp:
        mapping.to_csv(tmp, index=False)
    split = kc.index.set_index("id")["split"]
    got = split.loc[mapping["id"]].value_counts()
    total = kc.index["split"].value_counts()
    return SlideMapResult(
        out,
        int(got.get("train", 0)),
        int(total.get("train", 0)),
        int(got.get("test", 0)),
        int(total.get("test", 0)),
        ambiguous,
    )
