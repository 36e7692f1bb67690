"""What the search's own fold models are worth: one search, then three ways to a submission.

    python benchmarks/ensemble.py [--settings embedded hard] [--search-s 300] [--top 10]

On each dataset setting (benchmarks/anytime.py's generator settings, with known test labels):
one default ``pcam-search --timeout S [--max-epochs E]`` (it keeps the fold models and OOF of
its top trials),
then, side by side on that study:

  (i)   ``pcam-refit --best --retrain``: the best params trained again on every fold (v0.1);
  (ii)  ``pcam-refit --best``: the best trial's own fold models, no training;
  (iii) ``pcam-refit --ensemble N``: greedy selection with replacement over the N best kept
        trials' OOF (no training), with its nested estimate.

Prints test AUC (k fold models x 8 dihedral views), OOF AUC, wall seconds and, for (iii), the
nested estimate, its distance to the test AUC and how much of that distance is the data's:
the same fold models over the same views score their held-out folds and the test slides
differently (``validation - test``), which no estimate made on the training slides can see.
Writes ``benchmarks/out/ensemble.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna

from search.common.attrs import get_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anytime import OUT, SETTINGS, dataset  # noqa: E402  same data as the anytime benchmark

BIN = Path(sys.executable).parent


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def one_setting(name: str, search_s: float, top: int, max_epochs: int | None) -> dict:
    data_dir = dataset(name)
    studies = OUT / "studies" / f"{name}-ens"
    shutil.rmtree(studies, ignore_errors=True)
    common = ["--studies-dir", str(studies), "--cache-dir", str(OUT / "cache"), "--no-progress"]
    search = [str(BIN / "pcam-search"), "--data", str(data_dir), "--trials", "100000"]
    if max_epochs:
        search += ["--max-epochs", str(max_epochs)]
    t_search = _run([*search, "--timeout", str(search_s), "--keep-top", str(top), *common])
    study = optuna.load_study(study_name="pcam", storage=f"sqlite:///{studies / 'pcam.db'}")
    refit = [str(BIN / "pcam-refit"), "--force", *common]
    rows = {}
    for key, extra in (
        ("i", ["--best", "--retrain"]),
        ("ii", ["--best"]),
        ("iii", ["--ensemble", str(top)]),
    ):
        wall = _run([*refit, *extra])
        rec = get_record(
            optuna.load_study(study_name="pcam", storage=f"sqlite:///{studies / 'pcam.db'}"),
            "refit",
        )
        rows[key] = {
            "test_auc": rec["test_auc"],
            "oof_auc": rec["oof_auc"],
            "wall": wall,
            "nested_auc": rec.get("nested_auc"),
            "nested_pooled_auc": rec.get("nested_pooled_auc"),
            "validation_minus_test": rec.get("validation_minus_test"),
            "members": [(m["label"], round(m["weight"], 3)) for m in rec.get("members", [])],
        }
        print(f"  [{name}] ({key}) {json.dumps(rows[key])}", flush=True)
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    return {"search_s": t_search, "complete": complete, "refits": rows}


def table(results: dict) -> None:
    names = {"i": "(i) retrain best", "ii": "(ii) best's own models", "iii": "(iii) ensemble"}
    head = f"{'setting':<10}{'method':<24}{'test AUC':>9}{'vs (i)':>8}{'OOF AUC':>9}"
    print(f"\n{head}{'wall s':>8}")
    for setting, r in results.items():
        base = r["refits"]["i"]["test_auc"]
        for key, row in r["refits"].items():
            print(
                f"{setting:<10}{names[key]:<24}{row['test_auc']:>9.4f}"
                f"{row['test_auc'] - base:>+8.4f}{row['oof_auc']:>9.4f}{row['wall']:>8.1f}"
            )
        ens = r["refits"]["iii"]
        print(
            f"{'':<10}nested estimate {ens['nested_auc']:.4f} (pooled "
            f"{ens.get('nested_pooled_auc') or float('nan'):.4f}), test - nested "
            f"{ens['test_auc'] - ens['nested_auc']:+.4f}, of which held-out folds vs test "
            f"(same models and views) {-(ens.get('validation_minus_test') or float('nan')):+.4f}"
            f"; members {ens['members']}; search {r['search_s']:.0f} s, "
            f"{r['complete']} COMPLETE trials"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["embedded", "hard"], choices=list(SETTINGS))
    ap.add_argument("--search-s", type=float, default=300, help="search timeout per setting")
    ap.add_argument("--top", type=int, default=10, help="kept trials = ensemble candidates")
    ap.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="epochs per trial (default: the CPU default, 12; on 2 cores a 5-minute search "
        "then finishes 1-3 trials: 4 gives selection something to choose from)",
    )
    args = ap.parse_args()
    path = OUT / "ensemble.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.settings:
        print(f"[{name}] search {args.search_s:.0f} s ...", flush=True)
        results[name] = one_setting(name, args.search_s, args.top, args.max_epochs)
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    table(results)


if __name__ == "__main__":
    main()
