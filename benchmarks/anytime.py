"""Model quality per unit of compute: pcam-search against what a user would do instead.

    python benchmarks/anytime.py [--budget 600] [--settings embedded hard stain]
                                 [--methods a b c d] [--seed 0] [--curve 200]

On each dataset setting (the embedded set and harder generator settings, all with known test
labels) and the same end-to-end wall budget (search + building the submission), side by side:

  (a) ``pcam-search --budget B``: the CPU defaults (cpu.toml, fold racing, short complete
      trials, then the best params trained on every labelled patch for as many epochs as fit
      the rest of the budget);
  (b) the v0.1 CPU defaults under the same budget: ``--space cpu-v1 --max-epochs 2 --no-race
      --grace-period 3`` (rung at epoch 1, as before);
  (c) a plain Optuna script (below): TPE + SuccessiveHalvingPruner over the same space, folds
      and epochs, no Ray, its search ``timeout`` set to 3/4 of the budget; then the best
      params trained on every fold and submitted, as ``pcam-refit`` does;
  (d) one fixed, sensible configuration (the hand-chosen notebook recipe: width 16, 48 px,
      one-cycle, full augmentation) trained on every fold for as many epochs as fit the budget;
  (e) the same recipe trained as (a)'s final model is (one model on every labelled row, for
      as many epochs as fit): what (a) gains from its final fit alone, without searching;
  (f) the users' flow: ``pcam-search --timeout T`` (T = ``--flow-share`` of the budget), then
      ``pcam-refit --best --time R`` with R what the search left of the budget.

``--load N``: N busy-looping processes run beside each method (a loaded machine; 1 = one of
the two cores taken). Results are kept as "<setting>/load<N>".
For (a) and (f) the deadline's waste is printed: fold-epochs of trials the run stopped
unfinished (interrupted) over all fold-epochs trained in the search.

For each: the submission's test AUC (k fold models x 8 dihedral views), the CV AUC it was
chosen by, CV - test, fold-epochs trained (search + submission) and wall seconds. Writes
``benchmarks/out/anytime.json`` and a plot ``benchmarks/out/anytime.html``.

``--seed S``: the run's seed (pcam-search --seed, TPE's, the fixed recipe's training seed);
results of S > 0 are kept as "<setting>/seed<S>", beside seed 0's, to measure run-to-run spread.

``--curve N``: a default ``pcam-search --trials N`` on the embedded set, printing the
best-so-far mean AUC by trial number (does more search still buy a better model?).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.folds import folds_for_cache
from data_pipeline.synth import SynthConfig, write
from search.common.attrs import get_record
from search.common.ensemble import Ensemble
from search.training.engine import TrainData, TrainParams, train_cv, train_full
from search.training.results import TrialError
from search.tuning.space import load_space, suggest

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "benchmarks" / "out"
K, MAX_EPOCHS, TTA = 3, 12, 8  # the CPU defaults (search/common/config.py)
# Generator settings: the embedded set, then harder ones (weaker tumour signal + more label
# noise; wider stain spread + fewer patches per slide), each from its own seed.
SETTINGS = {
    "embedded": SynthConfig(),
    "hard": SynthConfig(
        n=3000, n_test=1000, seed=1, tumour_signal=0.5, flip_rate=0.05, patches_per_slide=30
    ),
    "stain": SynthConfig(
        n=3000, n_test=1000, seed=2, stain_range=2.0, tumour_signal=0.75, patches_per_slide=16
    ),
}
# (d): the hand-chosen notebook recipe, the anchor a search must beat
FIXED = {
    "arch": "simple_cnn",
    "width": 16,
    "crop": 48,
    "lr": 3e-3,
    "optimizer": "adamw",
    "batch_size": 128,
    "dropout": 0.2,
    "weight_decay": 1e-4,
    "schedule": "onecycle",
    "aug": 1.0,
}
OLD = ["--space", "cpu-v1", "--max-epochs", "2", "--no-race", "--grace-period", "3"]
OLD += ["--search-share", "1"]  # v0.1 submitted the best trial's fold models


def dataset(name: str) -> Path:
    """The setting's Kaggle-layout folder under benchmarks/out/data (generated once)."""
    d = OUT / "data" / name
    if not d.is_dir():
        write(d, SETTINGS[name], "kaggle")
    return d


def _load(data_dir: Path):
    cache = open_dataset(DataConfig(data=data_dir, cache_dir=OUT / "cache"), progress=False)
    fd = folds_for_cache(cache, K, 0, "slide")
    data = TrainData.from_cache(cache, fd["row"].to_numpy())
    return cache, data, fd["fold"].to_numpy(np.int64)


def submit(params: dict, epochs: int, cache, data, folds, seed: int = 0) -> dict:
    """Train ``params`` on every fold, then the TTA fold ensemble on the test set (as refit)."""
    p = TrainParams.from_dict(params)
    r = train_cv(p, data, folds, epochs=epochs, keep_states=True, threads=2, seed=seed)
    return {**_predict_states(p, r.states, cache), "cv_auc": r.final["auc"]}


def _predict_states(p: TrainParams, states: list[dict], cache) -> dict:
    """Test AUC of the TTA ensemble of ``states`` on the generator's held-out test slides."""
    from sklearn.metrics import roc_auc_score

    rows = cache.rows("test")
    probs = Ensemble.from_states(states, p).predict(np.asarray(cache.images[rows]), tta=TTA)
    y = cache.index["label"].to_numpy()[rows]
    return {"test_auc": float(roc_auc_score(y, probs))}


def run_cli(name: str, data_dir: Path, budget: float, extra: list[str]) -> dict:
    """(a) / (b): pcam-search --budget in its own studies folder; read the study after."""
    studies = OUT / "studies" / name
    if studies.exists():
        import shutil

        shutil.rmtree(studies)
    cmd = [
        str(Path(sys.executable).parent / "pcam-search"),
        "--data",
        str(data_dir),
        "--cache-dir",
        str(OUT / "cache"),
        "--studies-dir",
        str(studies),
        "--trials",
        "100000",
        "--budget",
        str(budget),
        "--no-progress",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    (studies / "console.log").write_text(proc.stdout + proc.stderr)  # why it split as it did
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s = optuna.load_study(study_name="pcam", storage=f"sqlite:///{studies / 'pcam.db'}")
    refit = get_record(s, "refit")
    cfg = get_record(s, "config")
    done = [t for t in s.trials if t.state.name in ("COMPLETE", "PRUNED")]
    return {
        "test_auc": refit["test_auc"],
        "cv_auc": refit["oof_auc"],  # the submitted fold models' OOF AUC
        # the final model's, when it was trained again (else the best trial's own, counted)
        "fold_epochs": sum(t.user_attrs.get("fold_epochs", 0) for t in s.trials)
        + _final_fold_epochs(refit, cfg["folds"]),
        "final_epochs": refit["epochs"],
        "wall": wall,
        "search_s": wall - refit["seconds"]["train"] - refit["seconds"]["predict"],
        "trials": len(done),
        "complete": sum(t.state.name == "COMPLETE" for t in s.trials),
        "waste": _waste(s),
        "best_params": s.best_params,
    }


def _waste(s: optuna.Study) -> float:
    """Fold-epochs of interrupted trials (stopped unfinished by the run) over all trained."""
    fe = [
        (t.user_attrs.get("fold_epochs", 0), bool(t.user_attrs.get("interrupted")))
        for t in s.trials
    ]
    total = sum(n for n, _ in fe)
    return sum(n for n, cut in fe if cut) / total if total else 0.0


def users_flow(name: str, data_dir: Path, budget: float, share: float, seed: int = 0) -> dict:
    """(f): ``pcam-search --timeout T`` then ``pcam-refit --best --time R``, R = the rest."""
    import shutil

    studies = OUT / "studies" / name
    shutil.rmtree(studies, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    where = ["--cache-dir", str(OUT / "cache"), "--studies-dir", str(studies)]
    search = [str(bin_dir / "pcam-search"), "--data", str(data_dir), *where]
    search += ["--trials", "100000", "--timeout", str(budget * share), "--no-progress"]
    search += ["--seed", str(seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(search, capture_output=True, text=True, env=dict(os.environ))
    log = proc.stdout + proc.stderr
    search_s = time.perf_counter() - t0
    left = max(budget - search_s, 1.0)
    refit = [str(bin_dir / "pcam-refit"), "--best", "--time", f"{left:.0f}", *where]
    refit += ["--no-progress", "--force", "--seed", str(seed)]
    proc2 = subprocess.run(refit, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    (studies / "console.log").write_text(log + proc2.stdout + proc2.stderr)
    if proc.returncode != 0 or proc2.returncode != 0:
        sys.exit(
            f"users' flow failed:\n{log[-3000:]}\n{proc2.stdout[-2000:]}{proc2.stderr[-2000:]}"
        )
    s = optuna.load_study(study_name="pcam", storage=f"sqlite:///{studies / 'pcam.db'}")
    rec = get_record(s, "refit")
    done = [t for t in s.trials if t.state.name in ("COMPLETE", "PRUNED")]
    return {
        "test_auc": rec["test_auc"],
        "cv_auc": rec["oof_auc"],
        "fold_epochs": sum(t.user_attrs.get("fold_epochs", 0) for t in s.trials)
        + _final_fold_epochs(rec, get_record(s, "config")["folds"]),
        "final_epochs": rec["epochs"],
        "path": rec.get("path"),
        "wall": wall,
        "search_s": search_s,
        "trials": len(done),
        "complete": sum(t.state.name == "COMPLETE" for t in s.trials),
        "waste": _waste(s),
        "best_params": s.best_params,
    }


def _final_fold_epochs(refit: dict, k: int) -> int:
    """Fold-epochs of the final model (0 when the best trial's own fold models were used)."""
    if not refit["trained"]:
        return 0
    if refit.get("full_fit"):
        return round(refit["full_fit"] * refit["epochs"] * k / (k - 1))
    return k * refit["epochs"]


def plain_optuna(data_dir: Path, search_s: float, seed: int = 0) -> dict:
    """(c) What a user writes instead: TPE + SuccessiveHalvingPruner, same space and folds."""
    t0 = time.perf_counter()
    cache, data, folds = _load(data_dir)
    space = load_space("cpu")
    fold_epochs = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal fold_epochs
        params = suggest(trial, space)

        def on_epoch(epoch: int, m: dict) -> bool:
            trial.report(m["auc"], epoch)
            return trial.should_prune()

        r = train_cv(
            params, data, folds, epochs=MAX_EPOCHS, threads=2, on_epoch=on_epoch, seed=seed
        )
        fold_epochs += r.epochs_run * K
        if r.stopped_early:
            raise optuna.TrialPruned()
        return r.final["auc"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(),
    )
    study.optimize(objective, timeout=search_s - (time.perf_counter() - t0), catch=(TrialError,))
    best = {**space.fixed, **study.best_params}
    res = submit(best, MAX_EPOCHS, cache, data, folds, seed)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    return {
        **res,
        "cv_auc": study.best_value,
        "fold_epochs": fold_epochs + K * MAX_EPOCHS,
        "wall": time.perf_counter() - t0,
        "trials": len(done),
        "complete": sum(t.state.name == "COMPLETE" for t in study.trials),
        "best_params": study.best_params,
    }


def fixed_config(data_dir: Path, budget: float, seed: int = 0) -> dict:
    """(d) One sensible configuration, trained on every fold for as long as the budget allows:
    a 1-epoch probe of fold 0 gives the seconds per fold-epoch."""
    t0 = time.perf_counter()
    cache, data, folds = _load(data_dir)
    # fold 0 alone for one epoch (racing, stopped at its first report): one fold-epoch
    probe = train_cv(FIXED, data, folds, epochs=2, threads=2, race_epochs=1, on_epoch=_stop)
    per_fold_epoch = probe.seconds
    left = budget - (time.perf_counter() - t0) - 15  # predicting and loading: ~15 s
    epochs = max(1, int(left / (per_fold_epoch * K)))
    res = submit(FIXED, epochs, cache, data, folds, seed)
    return {
        **res,
        "fold_epochs": 1 + epochs * K,
        "wall": time.perf_counter() - t0,
        "trials": 1,
        "complete": 1,
        "best_params": {**FIXED, "epochs": epochs},
    }


def fixed_full(data_dir: Path, budget: float, seed: int = 0) -> dict:
    """(e) The same fixed recipe as (d), trained as pcam-search --budget's final model is by
    default: one model on every labelled row (k/(k-1) fold-epochs per epoch, so ~2x (d)'s
    epochs), for as long as the budget allows. Tells the search's share of (a)'s result from
    the final fit's."""
    t0 = time.perf_counter()
    cache, data, folds = _load(data_dir)
    probe = train_cv(FIXED, data, folds, epochs=2, threads=2, race_epochs=1, on_epoch=_stop)
    left = budget - (time.perf_counter() - t0) - 15
    epochs = max(1, int(left / (probe.seconds * K / (K - 1))))
    p = TrainParams.from_dict(FIXED)
    states = train_full(p, data, epochs=epochs, seeds=[seed], threads=2)
    res = _predict_states(p, states, cache)
    return {
        **res,
        "cv_auc": float("nan"),  # nothing held out: no CV estimate of its own
        "fold_epochs": 1 + round(epochs * K / (K - 1)),
        "wall": time.perf_counter() - t0,
        "trials": 1,
        "complete": 1,
        "best_params": {**FIXED, "epochs": epochs, "full_fit": 1},
    }


def _stop(epoch: int, metrics: dict) -> bool:
    return True


def curve(trials: int) -> None:
    """Best-so-far mean AUC by trial number for a default pcam-search on the embedded set."""
    studies = OUT / "studies" / f"curve-{trials}"
    cmd = [
        str(Path(sys.executable).parent / "pcam-search"),
        "--trials",
        str(trials),
        "--studies-dir",
        str(studies),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ))
    print(
        f"\ndefault pcam-search --trials {trials} on the embedded set: "
        f"{time.perf_counter() - t0:.0f} s"
    )
    curve_table(studies / "pcam.db")


def curve_table(db: Path) -> None:
    """The best-so-far table of a study (also of one stopped before its last trial): by
    trials finished, in order of finishing, the best COMPLETE mean AUC and which trial."""
    s = optuna.load_study(study_name="pcam", storage=f"sqlite:///{db}")
    done = [t for t in s.trials if t.state.is_finished()]
    best, at = (-1.0, None), []
    for t in sorted(done, key=lambda t: t.datetime_complete):
        if t.state.name == "COMPLETE" and t.value > best[0]:
            best = (t.value, t.number)
        at.append(best)
    hours = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / 3600
    print(f"{len(done)} trials finished ({hours:.1f} trial-hours)")
    print(f"{'trials finished':>16}{'best mean AUC':>15}{'(trial)':>9}")
    for n in sorted({5, 10, 25, 50, 75, 100, 150, 200, 300, 400, len(at)}):
        if 0 < n <= len(at):
            print(f"{n:>16}{at[n - 1][0]:>15.4f}{at[n - 1][1]:>9}")


METHODS = {
    "a": "pcam-search (new defaults)",
    "b": "pcam-search (v0.1 defaults)",
    "c": "plain Optuna + SHA",
    "d": "fixed config",
    "e": "fixed config, full-data fit",
    "f": "users' flow: search, refit",
}


def _busy() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=600, help="seconds end to end, each run")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (see above)")
    ap.add_argument("--curve", type=int, default=0, help="also the best-so-far of N trials")
    ap.add_argument("--curve-of", type=Path, help="only print the best-so-far of this study db")
    ap.add_argument("--flow-share", type=float, default=0.4, help="(f): the search's share")
    ap.add_argument("--load", type=int, default=0, help="busy processes beside each method")
    args = ap.parse_args()
    if args.curve_of:
        return curve_table(args.curve_of)
    torch.set_num_threads(2)
    results = (
        json.loads((OUT / "anytime.json").read_text()) if (OUT / "anytime.json").is_file() else {}
    )
    for name in args.settings:  # data, caches and folds first: no method pays for building them
        _load(dataset(name))
    for name in args.settings:
        data_dir = dataset(name)
        search_s = args.budget * 0.75  # (c): its refit (12 epochs) gets the rest
        key = name if args.seed == 0 else f"{name}/seed{args.seed}"
        key += f"/load{args.load}" if args.load else ""
        seed = ["--seed", str(args.seed)]
        tag = key.replace("/", "-")  # its studies folder
        for m in args.methods:
            print(f"[{name}] ({m}) {METHODS[m]} ...", flush=True)
            import multiprocessing as mp

            busy = [mp.Process(target=_busy, daemon=True) for _ in range(args.load)]
            for b in busy:
                b.start()
            try:
                r = _run_method(m, tag, name, data_dir, args, search_s, seed)
            finally:
                for b in busy:
                    b.terminate()
            r["gap"] = r["cv_auc"] - r["test_auc"]
            results.setdefault(key, {})[m] = {**r, "budget": args.budget}
            print(f"    {json.dumps({k: v for k, v in r.items() if k != 'best_params'})}")
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "anytime.json").write_text(json.dumps(results, indent=1, default=str))
    table(results)
    plot(results)
    if args.curve:
        curve(args.curve)


def _run_method(m: str, tag: str, name: str, data_dir: Path, args, search_s: float, seed) -> dict:
    """One method's run on one setting (see the module docstring)."""
    if m == "a":
        return run_cli(f"{tag}-a", data_dir, args.budget, seed)
    if m == "b":
        return run_cli(f"{tag}-b", data_dir, args.budget, OLD + seed)
    if m == "c":
        return plain_optuna(data_dir, search_s, args.seed)
    if m == "d":
        return fixed_config(data_dir, args.budget, args.seed)
    if m == "e":
        return fixed_full(data_dir, args.budget, args.seed)
    return users_flow(f"{tag}-f", data_dir, args.budget, args.flow_share, args.seed)


def table(results: dict) -> None:
    print(
        f"\n{'setting':<10}{'method':<30}{'test AUC':>9}{'vs (d)':>8}{'CV AUC':>8}{'CV-test':>8}"
        f"{'fold-ep':>8}{'trials':>7}{'wall s':>7}{'waste':>7}"
    )
    for name, by in results.items():
        ref = by.get("d", {}).get("test_auc")
        for m, r in sorted(by.items()):
            vs = f"{r['test_auc'] - ref:+.4f}" if ref else "-"
            print(
                f"{name:<10}{f'({m}) ' + METHODS[m]:<30}{r['test_auc']:>9.4f}{vs:>8}"
                f"{r['cv_auc']:>8.4f}{r['gap']:>+8.4f}{r['fold_epochs']:>8d}{r['trials']:>7d}"
                f"{r['wall']:>7.0f}{_pct(r.get('waste')):>7}"
            )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def plot(results: dict) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for m in METHODS:
        xs = [n for n in results if m in results[n]]
        fig.add_bar(name=f"({m}) {METHODS[m]}", x=xs, y=[results[n][m]["test_auc"] for n in xs])
    fig.update_layout(
        title="Submission test AUC at the same end-to-end wall budget (2 CPU cores)",
        barmode="group",
        yaxis_title="test AUC",
        yaxis_range=[0.8, 1.0],
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fig.write_html(OUT / "anytime.html", include_plotlyjs=True)
    print(f"plot: {OUT / 'anytime.html'}")


if __name__ == "__main__":
    main()
