"""``pcam-refit --ensemble N``: a submission from several trials' fold models, no training.

Candidates are the fold models the search kept (its top ``--keep-top`` COMPLETE trials; the
best ``N`` of them) and any final model a refit trained again (``--budget``, ``--retrain``),
all on the same data and folds. Greedy forward selection with replacement on their
out-of-fold probabilities, predicted again over the test's TTA views (``with_test_views``),
picks the members and weights (``search.submission.selection``); a nested estimate says what the
selection is worth on rows it did not choose on. Each member predicts
the test set with its own crop and normalisation; its predictions are cached by the hash of
its ``ensemble.json``, the dataset fingerprint and the TTA views, so selecting again costs no
inference. Output: ``studies/<study>/refit/ensemble/`` (multi-trial ``ensemble/`` that
pcam-predict loads, ``oof.csv``, ``submission.csv``, ``refit.json``) and the study's
``refit`` attr.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from optuna.trial import TrialState
from rich.console import Console

from data_pipeline.atomic import atomic_path, remove
from search.common.attrs import MODELS_DIR, set_refit
from search.common.ensemble import (
    META_FILE,
    Ensemble,
    EnsembleError,
    WeightedEnsemble,
    load_ensemble,
    load_oof,
    save_members,
)
from search.common.study import value_of
from search.submission.inputs import (
    RefitConfig,
    RefitError,
    Setup,
    check_outputs_writable,
    open_setup,
)
from search.submission.outputs import (
    OOF_CSV,
    REFIT_JSON,
    SUBMISSION,
    moved,
    pool_images,
    progress_bar,
    refuse_earlier,
    stage_dir,
    submission_frame,
    swap_in,
    write_csv_atomic,
)
from search.submission.selection import (
    MAX_STEPS,
    Nested,
    Selection,
    greedy_select,
    nested_estimate,
)
from search.training.metrics import auc, blend, fold_aucs

ENSEMBLE_DIR = "ensemble"  # studies/<study>/refit/ensemble
TEST_CACHE_DIR = "test-cache"  # studies/<study>/refit/test-cache: member test predictions


@dataclass
class Candidate:
    """One trial's fold models that may join the ensemble."""

    label: str  # "trial 12" or "trial 12 retrained, 40 epochs"
    trial: int
    folder: Path
    oof: np.ndarray  # (N,) fold-file order
    oof_auc: float  # of ``oof``: one view as saved, or the test's views (with_test_views)
    search_oof_auc: float  # of the one-view OOF the search (or the refit) saved


def _candidate(folder: Path, label: str, trial: int, su: Setup) -> Candidate | None:
    """The fold models in ``folder`` if they were trained on this data and these folds and
    carry their OOF; else None."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    same = meta.get("dataset_fingerprint") == su.cache.fingerprint
    if not same or Path(meta.get("folds_file", "")).name != Path(su.folds_file).name:
        return None
    oof = load_oof(folder)
    if oof is None or len(oof) != len(su.data.labels):
        return None
    auc_all = auc(su.data.labels, oof)
    return Candidate(label, trial, folder, oof, auc_all, auc_all)


def candidates(su: Setup, studies_dir: Path, n: int) -> list[Candidate]:
    """The kept fold models of the best ``n`` COMPLETE trials, plus every retrained final
    model of this study; best OOF AUC first (selection breaks ties toward the front)."""
    done = [t for t in su.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    kept: list[Candidate] = []
    for t in sorted(done, key=value_of, reverse=True):
        path = t.user_attrs.get(MODELS_DIR)
        c = _candidate(Path(path), f"trial {t.number}", t.number, su) if path else None
        if c is not None and len(kept) < n:
            kept.append(c)
    refits = Path(studies_dir) / su.study.study_name / "refit"
    seen = {_weights_key(c.folder) for c in kept}
    for folder in sorted(refits.glob("trial-*/ensemble")):
        if _weights_key(folder) in seen:  # a refit that reused a kept trial's own models
            continue
        meta = json.loads((folder / META_FILE).read_text())
        trial = int(meta.get("trial", -1))
        label = _refit_label(folder, trial, meta.get("epochs"))
        c = _candidate(folder, label, trial, su)
        if c is not None:
            kept.append(c)
            seen.add(_weights_key(folder))
    return sorted(kept, key=lambda c: c.oof_auc, reverse=True)


def _refit_label(folder: Path, trial: int, epochs: object) -> str:
    """How a refit's ensemble is shown: retrained, or the trial's own fold models that a
    ``--reuse`` refit copied (its refit.json says ``trained: false``)."""
    record = folder.parent / REFIT_JSON
    try:
        trained = json.loads(record.read_text()).get("trained", True)
    except (OSError, ValueError):
        trained = True
    if not trained:
        return f"trial {trial} (its search fold models, copied by a refit)"
    return f"trial {trial} retrained, {epochs} epochs"


def _weights_key(folder: Path) -> tuple:
    """The fold weights' hashes: the same models copied elsewhere have the same key."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        return tuple(f["sha256"] for f in meta.get("folds", []))
    except (OSError, ValueError):
        return (str(folder),)


def _cached(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``'s predictions, computed once and kept at ``path`` (written atomically):
    a second selection or refit over the same members runs no inference."""
    if path.is_file():
        return np.load(path, allow_pickle=False)
    pred = compute()
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, pred)
    return pred


def with_test_views(
    cands: list[Candidate], su: Setup, cfg: RefitConfig, cache_dir: Path
) -> list[Candidate]:
    """The candidates with their OOF predicted again over the test's ``cfg.tta`` views
    (each fold model on its own held-out rows; cached per member, data, folds and views).

    Selection and its nested estimate then score the predictor that will predict the test
    set; the search saved one-view OOF (what its trials are ranked by), which is weaker by
    about what TTA adds, so a nested estimate on it is pessimistic."""
    if cfg.tta == 1:
        return cands
    out = []
    label = f"out-of-fold predictions over {cfg.tta} views, per candidate"
    with progress_bar(label, cfg.progress) as bar:
        task = bar.add_task("oof", total=len(cands))
        for c in cands:
            path = cache_dir / f"{_member_key(c.folder, su)}-oof-tta{cfg.tta}.npy"
            oof = _cached(path, functools.partial(_held_out, c.folder, su, cfg))
            out.append(replace(c, oof=oof, oof_auc=auc(su.data.labels, oof)))
            bar.advance(task)
    return out


def _held_out(folder: Path, su: Setup, cfg: RefitConfig) -> np.ndarray:
    """One candidate's OOF over the test's views: (N,), fold-file order."""
    ens = load_ensemble(folder, cfg.device)
    if not isinstance(ens, Ensemble):
        raise EnsembleError(f"{folder}: a candidate must be one trial's fold models")
    return ens.predict_held_out(su.data.images, su.folds, cfg.tta)


def _member_key(folder: Path, su: Setup) -> str:
    """A candidate's cache key: its weights, the data's fingerprint and the folds file."""
    ident = f"{_weights_key(folder)}-{su.cache.fingerprint}-{Path(su.folds_file).name}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


@dataclass
class EnsembleResult:
    record: dict  # what refit.json and the study's refit attr hold
    submission: Path | None


def refit_ensemble(cfg: RefitConfig, n: int, console: Console) -> EnsembleResult:
    """Select, save, predict, write and record (see the module docstring). The outputs are
    written into a stage folder that replaces ``refit/ensemble/`` as a whole at the end: an
    interrupted selection leaves the earlier one as it was."""
    t0 = time.perf_counter()
    check_outputs_writable(cfg)
    su = open_setup(cfg)
    final_dir = (cfg.studies_dir / cfg.study / "refit" / ENSEMBLE_DIR).resolve()
    sub_path = Path(cfg.out).resolve() if cfg.out else final_dir / SUBMISSION
    refuse_earlier([sub_path, final_dir / REFIT_JSON], cfg.force)  # before any work
    cache_dir = final_dir.parent / TEST_CACHE_DIR
    chosen = _select(cfg, su, n, console, cache_dir)
    stage = stage_dir(final_dir)
    try:
        out = _write(cfg, su, chosen, stage, sub_path if cfg.out else stage / SUBMISSION, t0)
        record = {
            k: str(moved(Path(v), stage, final_dir)) if k in PATHS and v else v
            for k, v in out.record.items()
        }
        (stage / REFIT_JSON).write_text(json.dumps(record, indent=2))
        swap_in(stage, final_dir)
    except BaseException:  # Ctrl-C, a full disk: the earlier selection stays as it was
        remove(stage)
        raise
    set_refit(su.study, json.loads(json.dumps(record)), final_dir / REFIT_JSON)
    return EnsembleResult(record, moved(out.submission, stage, final_dir))


PATHS = ("ensemble", "oof_csv", "submission")  # record keys that name files of the refit


@dataclass
class _Chosen:
    """The selection: every candidate, the greedy weights, the nested estimate."""

    cands: list[Candidate]
    sel: Selection
    nested: Nested
    members: list[tuple[Candidate, float]]  # weight > 0


def _select(cfg: RefitConfig, su: Setup, n: int, console: Console, cache_dir: Path) -> _Chosen:
    """The candidates' OOF over the test's views (cached), then greedy selection."""
    cands = candidates(su, cfg.studies_dir, n)
    if not cands:
        raise RefitError(
            f"study {cfg.study!r} kept no fold models with out-of-fold probabilities for this "
            "data: search with --keep-top > 0 (the default), or run pcam-refit --best"
        )
    t_views = time.perf_counter()
    cands = with_test_views(cands, su, cfg, cache_dir)
    cands.sort(key=lambda c: c.oof_auc, reverse=True)
    if cfg.tta > 1:
        console.print(
            f"out-of-fold predictions over the test's {cfg.tta} views for {len(cands)} "
            f"candidate(s): {time.perf_counter() - t_views:.0f} s (cached for the next selection)",
            highlight=False,
        )
    y, folds = su.data.labels, su.folds
    oof = np.stack([c.oof for c in cands])  # (M, N)
    sel = greedy_select(oof, y)
    nested = nested_estimate(oof, y, folds)
    _print_selection(console, cands, sel, nested)
    members = [(c, w) for c, w in zip(cands, sel.weights, strict=True) if w > 0]
    return _Chosen(cands, sel, nested, members)


def _write(
    cfg: RefitConfig, su: Setup, ch: _Chosen, out_dir: Path, sub_path: Path, t0: float
) -> EnsembleResult:
    """Save the chosen members' ensemble, the blended OOF and the submission into
    ``out_dir``; the record (``refit.json``) of what was written."""
    y, folds = su.data.labels, su.folds
    meta = {
        "study": cfg.study,
        "dataset_fingerprint": su.cache.fingerprint,
        "layout": su.cache.meta.get("layout"),
        "folds_file": su.folds_file,
        "k": su.k,
        "selection": {
            "oof_auc": ch.sel.auc,
            "curve": ch.sel.curve,
            "nested_auc": ch.nested.auc,
            "nested_pooled_auc": ch.nested.pooled_auc,
        },
    }
    infos = [(c.folder, w, {"label": c.label, "trial": c.trial}) for c, w in ch.members]
    ens_dir = save_members(out_dir / "ensemble", infos, meta)
    oof_blend = blend(np.stack([c.oof for c, _ in ch.members]), [w for _, w in ch.members])
    oof_df = pd.DataFrame({"id": su.data.ids, "label": y, "fold": folds, "prob": oof_blend})
    oof_csv = write_csv_atomic(oof_df, out_dir / OOF_CSV, force=True)
    t_select = time.perf_counter() - t0
    t1 = time.perf_counter()
    test = _predict(cfg, su, ens_dir, out_dir.parent / TEST_CACHE_DIR)
    submission = None
    if test["probs"] is not None:
        frame = submission_frame(su.cache, test["probs"], test["rows"])
        submission = write_csv_atomic(frame, sub_path, force=True)  # checked before any work
    seconds = {"select": round(t_select, 1), "predict": round(time.perf_counter() - t1, 1)}
    paths = {"ensemble": ens_dir, "oof_csv": oof_csv, "submission": submission}
    record = _record(cfg, su, ch, test, oof_blend, paths, seconds)
    return EnsembleResult(record, submission)


def _record(
    cfg: RefitConfig,
    su: Setup,
    ch: _Chosen,
    test: dict,
    oof_blend: np.ndarray,
    paths: dict,
    seconds: dict,
) -> dict:
    """``refit.json`` of a multi-trial ensemble: members, selection, estimates, files."""
    y, folds = su.data.labels, su.folds
    return {
        "kind": "ensemble",
        "label": f"ensemble of {len(ch.members)} ({', '.join(c.label for c, _ in ch.members)})",
        "trial": ch.members[0][0].trial,
        "tta": cfg.tta,
        "members": [
            {
                "label": c.label,
                "trial": c.trial,
                "weight": w,
                "oof_auc": c.oof_auc,
                "search_oof_auc": c.search_oof_auc,
                **m,
            }
            for (c, w), m in zip(ch.members, test["members"], strict=True)
        ],
        "candidates": [
            {"label": c.label, "oof_auc": c.oof_auc, "search_oof_auc": c.search_oof_auc}
            for c in ch.cands
        ],
        "oof_views": cfg.tta,  # OOF and selection over the test's TTA views
        "oof_auc": ch.sel.auc,
        "oof_auc_folds": fold_aucs(y, oof_blend, folds, su.k),
        "selection_curve": ch.sel.curve,
        "nested_auc": ch.nested.auc,  # mean of the left-out folds' AUCs
        "nested_pooled_auc": ch.nested.pooled_auc,
        "nested_fold_aucs": ch.nested.fold_aucs,
        "test_auc": test["auc"],
        "test_auc_folds": test["auc_folds"],
        "validation_minus_test": _gap(oof_blend, y, folds, test["auc_folds"]),
        "trained": False,
        "dataset_fingerprint": su.cache.fingerprint,
        "layout": su.cache.meta.get("layout"),
        "ensemble": str(paths["ensemble"]),
        "oof_csv": str(paths["oof_csv"]),
        "submission": str(paths["submission"]) if paths["submission"] else None,
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _predict(cfg: RefitConfig, su: Setup, ens_dir: Path, cache_dir: Path) -> dict:
    """Test predictions of the saved multi-trial ensemble (loaded as pcam-predict loads it),
    each member's from the cache when it is there; with test labels, each member's test AUC
    and the like-for-like per-fold scores (fold model f of every member, blended, over the
    same views as the OOF)."""
    ens = load_ensemble(ens_dir, cfg.device)
    if not isinstance(ens, WeightedEnsemble):
        raise EnsembleError(f"{ens_dir}: not a multi-trial ensemble")
    rows = su.cache.rows("test")
    out: dict[str, Any] = {"rows": rows, "probs": None, "auc": None, "auc_folds": None}
    out["members"] = [{} for _ in ens.members]
    if len(rows) == 0:
        return out
    images = lambda: pool_images(su.cache, rows)  # noqa: E731  read only on a miss
    keys = [
        hashlib.sha256(f"{e['sha256']}-{su.cache.fingerprint}".encode()).hexdigest()[:24]
        for e in ens.meta["members"]
    ]
    pairs = list(zip(ens.members, keys, strict=True))

    def per_fold_model(m: Ensemble, key: str) -> np.ndarray:  # (k, N) over cfg.tta views
        return _cached(
            cache_dir / f"{key}-tta{cfg.tta}-folds.npy",
            lambda: m.predict(images(), tta=cfg.tta, per_model=True),
        )

    per_fold = np.stack([per_fold_model(m, key) for m, key in pairs])  # (members, k, N)
    preds = per_fold.mean(1)  # each member's fold ensemble
    out["probs"] = blend(preds, ens.weights).astype(np.float32)
    y = su.cache.index["label"].to_numpy()[rows]
    if not (y >= 0).all():
        return out
    out["auc"] = auc(y, out["probs"])
    out["members"] = [{"test_auc": auc(y, p)} for p in preds]
    # like for like with the OOF: fold model f of every member, blended, same views
    fold_blend = blend(per_fold, ens.weights)  # (k, N)
    out["auc_folds"] = [auc(y, p) for p in fold_blend]
    return out


def _gap(
    oof: np.ndarray, y: np.ndarray, folds: np.ndarray, test_folds: list[float] | None
) -> float | None:
    """Mean per-fold held-out AUC of the blend minus the mean per-fold test AUC."""
    if test_folds is None:
        return None
    val = fold_aucs(y, oof, folds, len(test_folds))
    return float(np.mean(val) - np.mean(test_folds))


def _print_selection(
    console: Console, cands: list[Candidate], sel: Selection, nested: Nested
) -> None:
    console.print(
        f"ensemble selection over {len(cands)} candidate(s), greedy with replacement, "
        f"{MAX_STEPS} steps:"
    )
    for c, cnt, w in zip(cands, sel.counts, sel.weights, strict=True):
        mark = f"weight {w:.2f} ({cnt}x)" if cnt else "not chosen"
        one = "" if c.oof_auc == c.search_oof_auc else f" (1 view: {c.search_oof_auc:.4f})"
        console.print(f"  {c.label:<34} OOF AUC {c.oof_auc:.4f}{one}  {mark}", highlight=False)
    curve = " ".join(f"{a:.4f}" for a in sel.curve[: sum(sel.counts)])
    console.print(
        f"selection OOF AUC {sel.auc:.4f} (optimistic: chosen on the same predictions); "
        f"nested estimate {nested.auc:.4f} (mean AUC of each fold scored by a selection made "
        f"without it; pooled {nested.pooled_auc:.4f} against the selection's {sel.auc:.4f})\n"
        f"selection curve (OOF AUC by step): {curve}",
        highlight=False,
    )
