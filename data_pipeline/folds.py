"""Cross-validation folds: stratified by label, grouped by slide, duplicates kept together.

A random patch-level split leaks slides (shared stain, overlapping crops) into validation and
inflates AUC; grouping by slide is what makes the CV score predict the leaderboard.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from data_pipeline.atomic import atomic_path
from data_pipeline.constants import STRATEGIES

if TYPE_CHECKING:  # cache imports this module
    from data_pipeline.cache import Cache

# Below this share of labelled ids with a slide, "slide" folds are mostly patch folds (the
# Kaggle zip has no patch_id_wsi.csv: every patch is then its own group, the leak we prevent)
SLIDE_MAP_MIN = 0.5


def slide_coverage(slides: Sequence[str | None] | np.ndarray) -> float:
    """Share of rows that have a slide id (0..1)."""
    s = pd.Series(list(slides), dtype=object)
    return float((s.notna() & (s.astype(str) != "")).mean()) if len(s) else 0.0


def fold_label(strategy: str, coverage: float) -> str:
    """What the folds really are, for file names, study attrs and headers: ``slide``,
    ``slide-partial-map`` (some ids have no slide: each is its own group), ``patch-no-slide-map``
    (no slide ids at all: patch-level folds) or ``random``."""
    if strategy != "slide":
        return strategy
    if coverage == 0:
        return "patch-no-slide-map"
    return "slide" if coverage >= SLIDE_MAP_MIN else "slide-partial-map"


def slide_map_warning(coverage: float) -> str | None:
    """A plain sentence when slide folds cannot be honest, else None."""
    if coverage >= SLIDE_MAP_MIN:
        return None
    what = "no slide map" if coverage == 0 else f"a slide map covering {coverage:.0%} of ids"
    return (
        f"{what}: ids without a slide are each their own group, so the folds are "
        "(mostly) patch-level and leak slides into validation; CV AUC will be optimistic. "
        "Put patch_id_wsi.csv (id,wsi) beside train_labels.csv (README: 'Your own data')"
    )


def fold_groups(groups: Sequence[str | None], hashes: Sequence[str]) -> np.ndarray:
    """Integer group per row: its slide; rows without a slide are their own group; rows with
    identical image hashes are merged into one group (union-find), across slides too."""
    n = len(groups)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i in range(n):
        keys = []
        g = groups[i]
        if g is not None and g == g and str(g) != "":  # g == g filters NaN
            keys.append(("slide", str(g)))
        if hashes[i]:
            keys.append(("hash", str(hashes[i])))
        for key in keys:
            j = first.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def make_folds(
    labels: Sequence[int],
    groups: Sequence[str | None] | None,
    hashes: Sequence[str] | None,
    k: int,
    seed: int,
    strategy: str = "slide",
) -> np.ndarray:
    """Fold number (0..k-1) for every row.

    ``strategy="slide"``: ``StratifiedGroupKFold`` over slide groups (see ``fold_groups``).
    ``strategy="random"``: plain ``StratifiedKFold`` over patches (leaky; for comparison only),
    still keeping exact duplicates together. Deterministic for a given ``seed``.
    """
    y = np.asarray(labels)
    n = len(y)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if k < 2:
        raise ValueError(f"need at least 2 folds, got k={k}")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got values {sorted(set(np.unique(y)))[:5]}")
    counts = np.bincount(y, minlength=2)
    if counts.min() < k:
        raise ValueError(f"k={k} folds need at least {k} patches of each class; have {counts}")
    hashes = [""] * n if hashes is None else list(hashes)
    slides = [None] * n if (groups is None or strategy == "random") else list(groups)
    g = fold_groups(slides, hashes)
    n_groups = g.max() + 1
    if n_groups < k:
        raise ValueError(f"k={k} folds need at least {k} slide groups; found {n_groups}")
    folds = np.empty(n, dtype=np.int16)
    if n_groups == n:
        # every row its own group: StratifiedKFold gives the same guarantees much faster
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), y)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), y, g)
    for f, (_, held_out) in enumerate(splits):
        folds[held_out] = f
    return folds


def folds_file(cache: Cache, k: int, seed: int, strategy: str) -> Path:
    """Where ``folds_for_cache`` keeps a fold assignment inside the cache; the name says what
    the folds really are (``fold_label``)."""
    pool = cache.index["slide"].to_numpy()[cache.labelled_pool()]
    label = fold_label(strategy, slide_coverage(pool))
    return Path(cache.path) / "folds" / f"{label}-k{k}-s{seed}.csv"


def folds_for_cache(
    cache: Cache, k: int = 5, seed: int = 0, strategy: str = "slide"
) -> pd.DataFrame:
    """Folds of the cache's labelled pool (id, row, fold), made once and saved in the cache.

    Saved as ``<cache>/folds/<strategy>-k<k>-s<seed>.csv`` (written atomically) so search,
    refit and report all use identical folds; a later call just reads the file.
    """
    path = folds_file(cache, k, seed, strategy)
    if path.is_file():
        return pd.read_csv(path, dtype={"id": str})
    rows = cache.labelled_pool()
    idx = cache.index.iloc[rows]
    folds = make_folds(
        idx["label"].to_numpy(), idx["slide"].to_numpy(), idx["hash"].to_numpy(), k, seed, strategy
    )
    df = pd.DataFrame({"id": idx["id"].to_numpy(), "row": rows, "fold": folds})
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    summary = {
        "k": k,
        "seed": seed,
        "strategy": strategy,
        "per_fold": {
            int(f): {
                "n": int((folds == f).sum()),
                "pos_rate": round(float(idx["label"].to_numpy()[folds == f].mean()), 4),
            }
            for f in range(k)
        },
    }
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return df
