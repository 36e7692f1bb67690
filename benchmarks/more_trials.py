"""Do more trials buy a better submission? The users' flow without a deadline, by trial count.

    python benchmarks/more_trials.py [--settings embedded hard stain] [--trials 40]
                                     [--at 10 20 40] [--seed 0] [--baseline 0.9718 ...]
                                     [--no-promote]

On each generator setting (see ``anytime.py``): one default ``pcam-search --trials N`` (the
CPU defaults: 12-epoch trials, fold racing, ASHA, the growing top rung, no deadline; with
``--no-promote`` the search runs without the growing top rung, in a folder of its own), then
for each count n in
``--at`` the study's best COMPLETE trial among its first n finished trials (in order of
finishing) is submitted as ``pcam-refit --trial T`` submits it (``pcam-refit --best`` on a
study stopped after n trials: one model on every labelled patch for the final model's 48
epochs, 8 dihedral views). Printed per n: the best trial, its mean CV AUC (12 epochs, k
folds), the submission's test AUC and its ratio to the baseline (``--baseline``: one test AUC
per setting, e.g. ``pcam-search --budget 600`` from ``anytime.py --methods a``). The best
trial's own length is printed beside its CV AUC: a promoted trial's CV is scored at 24 or
48 epochs, the submission's own length at 48.

``--top M``: at the largest n, the M best COMPLETE trials are each submitted that way, and
their submissions' probabilities averaged (what spending M final models' compute on the top
configurations buys over the best one alone).

A search already in ``benchmarks/out/studies/more-<setting>-seed<S>`` with at least N
finished trials is reused (its wall time is then not known again). Writes
``benchmarks/out/more_trials.json``.
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
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anytime import OUT, SETTINGS, _load, dataset  # noqa: E402

from search.common.attrs import CONFIG, get_record  # noqa: E402
from search.tuning.ladder import epochs_of  # noqa: E402

BIN = Path(sys.executable).parent


def _study(studies: Path) -> optuna.Study | None:
    db = studies / "pcam.db"
    if not db.is_file():
        return None
    return optuna.load_study(study_name="pcam", storage=f"sqlite:///{db}")


def _finished(s: optuna.Study | None) -> list[optuna.trial.FrozenTrial]:
    """The study's finished trials in order of finishing."""
    if s is None:
        return []
    done = [t for t in s.trials if t.state.is_finished() and t.datetime_complete]
    return sorted(done, key=lambda t: t.datetime_complete)


def search(
    data_dir: Path, studies: Path, trials: int, seed: int, flags: list[str]
) -> float | None:
    """A default ``pcam-search --trials N`` (None: an earlier one is reused)."""
    if len(_finished(_study(studies))) >= trials:
        return None
    cmd = [str(BIN / "pcam-search"), "--data", str(data_dir), "--cache-dir", str(OUT / "cache")]
    cmd += ["--studies-dir", str(studies), "--trials", str(trials), "--seed", str(seed)]
    cmd += ["--no-progress", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    (studies / "console.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def best_by_count(s: optuna.Study, counts: list[int]) -> dict[int, optuna.trial.FrozenTrial]:
    """For each n: the best COMPLETE trial among the first n finished (None if none yet)."""
    done, out = _finished(s), {}
    for n in counts:
        complete = [t for t in done[:n] if t.state.name == "COMPLETE"]
        if len(done) >= n and complete:
            out[n] = max(complete, key=lambda t: t.value)
    return out


def submit(studies: Path, trial: int, seed: int) -> dict:
    """``pcam-refit --trial T`` (no --time: one full-data model x the final epochs); a refit
    of T already in this benchmark's study folder (an earlier, stopped run) is reused."""
    done = studies / "pcam" / "refit" / f"trial-{trial}" / "refit.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if rec.get("path") == "full" and rec.get("submission"):
            keys = ("test_auc", "epochs", "submission")
            return {**{k: rec[k] for k in keys}, "s": sum(rec["seconds"].values())}
    cmd = [str(BIN / "pcam-refit"), "--trial", str(trial), "--studies-dir", str(studies)]
    cmd += ["--cache-dir", str(OUT / "cache"), "--force", "--no-progress", "--seed", str(seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rec = get_record(_study(studies), "refit")
    return {
        "test_auc": rec["test_auc"],
        "epochs": rec["epochs"],
        "s": time.perf_counter() - t0,
        "submission": rec["submission"],
    }


def top_average(
    s: optuna.Study, studies: Path, data_dir: Path, m: int, n: int, refits: dict, seed: int
):
    """The M best COMPLETE trials among the first n, each submitted; their probabilities
    averaged. Returns (trials, mean member test AUC, the average's test AUC)."""
    done = [t for t in _finished(s)[:n] if t.state.name == "COMPLETE"]
    top = sorted(done, key=lambda t: t.value, reverse=True)[:m]
    for t in top:
        if t.number not in refits:
            print(f"  refitting trial {t.number} (top {m}) ...", flush=True)
            refits[t.number] = submit(studies, t.number, seed)
    cache = _load(data_dir)[0]
    test = cache.index.iloc[cache.rows("test")]
    labels = dict(zip(test["id"].astype(str), test["label"], strict=True))
    subs = [pd.read_csv(refits[t.number]["submission"], dtype={"id": str}) for t in top]
    ids = subs[0]["id"]
    probs = np.mean([sub.set_index("id").loc[ids, "label"].to_numpy() for sub in subs], axis=0)
    y = ids.map(labels).to_numpy()
    members = float(np.mean([refits[t.number]["test_auc"] for t in top]))
    return [t.number for t in top], members, float(roc_auc_score(y, probs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--trials", type=int, default=40, help="finished trials of the search")
    ap.add_argument("--at", type=int, nargs="+", default=[10, 20, 40], help="counts to submit at")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", type=float, nargs="*", default=[], help="test AUC per setting")
    ap.add_argument("--top", type=int, default=0, help="also the average of the M best")
    ap.add_argument("--no-promote", action="store_true", help="search without the top rung")
    args = ap.parse_args()
    flags, arm = (["--no-promote"], "-flat") if args.no_promote else ([], "")
    path = OUT / "more_trials.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    base = dict(zip(args.settings, args.baseline, strict=False))
    for name in args.settings:
        studies = OUT / "studies" / f"more-{name}-seed{args.seed}{arm}"
        wall = search(dataset(name), studies, args.trials, args.seed, flags)
        s = _study(studies)
        key = f"{name}/seed{args.seed}{arm}"
        # submissions made by an earlier run of this benchmark on the same study are reused
        earlier = results.get(key, {}).get("refits", {}) if wall is None else {}
        rows, refits = [], {int(t): r for t, r in earlier.items()}
        for n, t in best_by_count(s, args.at).items():
            if t.number not in refits:
                print(f"[{name}] best of {n} trials: trial {t.number}; refitting ...", flush=True)
                refits[t.number] = submit(studies, t.number, args.seed)
            length = epochs_of(t, int(get_record(s, CONFIG, {}).get("max_epochs", 12)))
            row = {"n": n, "trial": t.number, "cv_auc": t.value, "cv_epochs": length}
            rows.append({**row, **refits[t.number]})
        results[key] = {"wall_s": wall, "finished": len(_finished(s)), "rows": rows}
        if args.top > 1 and rows:
            n_last = rows[-1]["n"]
            top, members, avg = top_average(
                s, studies, dataset(name), args.top, n_last, refits, args.seed
            )
            results[key]["top"] = {"trials": top, "members_mean": members, "test_auc": avg}
        results[key]["refits"] = refits
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        table(key, results[key], base.get(name))


def table(key: str, r: dict, baseline: float | None) -> None:
    wall = "reused" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"
    print(f"\n{key}: default pcam-search, {r['finished']} trials finished ({wall})")
    head = f"{'trials':>7}{'best trial':>11}{'CV AUC':>8}{'CV ep':>6}{'test AUC':>10}{'epochs':>7}"
    print(head + (f"{'vs base':>9}  (base {baseline:.4f})" if baseline else ""))
    for x in r["rows"]:
        line = f"{x['n']:>7}{x['trial']:>11}{x['cv_auc']:>8.4f}{x.get('cv_epochs', 12):>6}"
        line += f"{x['test_auc']:>10.4f}"
        line += f"{x['epochs']:>7}"
        if baseline:
            line += f"{x['test_auc'] / baseline:>9.4f}"
        print(line)
    if "top" in r:
        t = r["top"]
        line = f"average of trials {t['trials']}: test AUC {t['test_auc']:.4f} "
        line += f"(members' mean {t['members_mean']:.4f})"
        if baseline:
            line += f", vs base {t['test_auc'] / baseline:.4f}"
        print(line)


if __name__ == "__main__":
    main()
