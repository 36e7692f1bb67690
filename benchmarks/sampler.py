"""TPE on the conditional CPU space: independent (``--sampler tpe``) against multivariate +
group (``--sampler tpe-multivariate``), both with constant_liar.

    python benchmarks/sampler.py [--settings hard stain] [--trials 24] [--seeds 0 1 2]

For each generator setting, sampler and seed: ``pcam-search --trials N --max-epochs 4`` (the
short complete trials of a deadline search) in its own studies folder, then the best mean CV
AUC after N/2 and after N trials, and the test AUC of the best trial's own fold models (k models
x 8 dihedral views) on the generator's held-out slides. Not timed: a trial's AUC does not depend
on the machine's load, so this may run beside other work. Writes ``benchmarks/out/sampler.json``
(results accumulate across runs: a run can be split by setting or seed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anytime import OUT, SETTINGS, TTA, dataset  # noqa: E402

from search.common.attrs import MODELS_DIR  # noqa: E402
from search.common.defaults import SAMPLERS  # noqa: E402

RESULTS = OUT / "sampler.json"
EPOCHS = 4  # the CPU default for a deadline search's trials (search.common.defaults)
# TPE samples its first 10 trials at random (n_startup_trials), the same draws for both
# samplers at one seed: only later trials show a difference
GUIDED_FROM = 10


def run(name: str, sampler: str, seed: int, trials: int) -> dict:
    """One search; its best-so-far CV AUC at half and all trials, and the best trial's test AUC."""
    studies = OUT / "studies" / f"sampler-{name}-{sampler}-{seed}"
    shutil.rmtree(studies, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "pcam-search"), "--data", str(dataset(name))]
    cmd += ["--cache-dir", str(OUT / "cache"), "--studies-dir", str(studies)]
    cmd += ["--trials", str(trials), "--max-epochs", str(EPOCHS), "--sampler", sampler]
    cmd += ["--seed", str(seed), "--keep-top", "1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    (studies / "console.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return _scores(studies, trials, name)


def _scores(studies: Path, trials: int, name: str) -> dict:
    """Best-so-far CV AUC at half and all finished trials, the best trial's test AUC, and the
    mean first-report AUC (fold 0 after its first epochs) of the trials TPE chose."""
    s = optuna.load_study(study_name="pcam", storage=f"sqlite:///{studies / 'pcam.db'}")
    best, curve = -np.inf, []
    done = [t for t in s.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    for t in sorted(done, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            best = max(best, t.value)
        curve.append(best)
    guided = [
        t.intermediate_values[min(t.intermediate_values)]
        for t in s.trials
        if t.number >= GUIDED_FROM and t.intermediate_values
    ]
    return {
        "half": curve[trials // 2 - 1],
        "best": s.best_value,
        "test": _test_auc(Path(s.best_trial.user_attrs[MODELS_DIR]), name),
        "guided": float(np.mean(guided)) if guided else float("nan"),
        "complete": sum(t.state == TrialState.COMPLETE for t in s.trials),
    }


def _test_auc(models: Path, name: str) -> float:
    """The best trial's kept fold models on the held-out slides (pcam-refit --reuse's model)."""
    from sklearn.metrics import roc_auc_score

    from data_pipeline.dataset import DataConfig, open_dataset
    from search.common.ensemble import load_ensemble

    cache = open_dataset(DataConfig(data=dataset(name), cache_dir=OUT / "cache"), progress=False)
    rows = cache.rows("test")
    probs = load_ensemble(models, "cpu").predict(np.asarray(cache.images[rows]), tta=TTA)
    return float(roc_auc_score(cache.index["label"].to_numpy()[rows], probs))


def table(results: dict) -> None:
    print(
        "\n| setting | sampler | best CV at N/2 | best CV at N | best trial: test AUC "
        "| TPE's trials: mean first-report AUC |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name in SETTINGS:
        for sampler in SAMPLERS:
            rs = [v for k, v in results.items() if k.startswith(f"{name}/{sampler}/")]
            if not rs:
                continue
            cols = []
            for key in ("half", "best", "test", "guided"):
                v = np.array([r[key] for r in rs])
                cols.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
            print(f"| {name} | {sampler} (n={len(rs)}) | " + " | ".join(cols) + " |")
    # paired by setting and seed: the two samplers saw the same data and training seed
    pairs = [
        (results[f"{n}/{SAMPLERS[1]}/{rest}"]["best"], r["best"])
        for key, r in results.items()
        for n, smp, rest in [key.split("/")]
        if smp == SAMPLERS[0] and f"{n}/{SAMPLERS[1]}/{rest}" in results
    ]
    if pairs:
        d = [a - b for a, b in pairs]
        print(
            f"\n{SAMPLERS[1]} - {SAMPLERS[0]}, best CV AUC at N, paired by setting and seed: "
            f"mean {np.mean(d):+.4f}, ahead in {sum(x > 0 for x in d)} of {len(d)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["hard", "stain"], choices=list(SETTINGS))
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--table", action="store_true", help="score the saved studies, print")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.table:  # scored again from the studies (a score added later covers old runs)
        for key, r in results.items():
            name, sampler, seed = key.split("/")
            folder = OUT / "studies" / f"sampler-{name}-{sampler}-{seed}"
            results[key] = {**_scores(folder, r["trials"], name), "trials": r["trials"]}
    if not args.table:
        for name in args.settings:
            for seed in args.seeds:
                for sampler in SAMPLERS:  # interleaved: a slow stretch hits both alike
                    r = run(name, sampler, seed, args.trials)
                    results[f"{name}/{sampler}/{seed}"] = {**r, "trials": args.trials}
                    print(f"{name} {sampler} seed {seed}: {r}", flush=True)
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    RESULTS.write_text(json.dumps(results, indent=1))
    table(results)


if __name__ == "__main__":
    main()
