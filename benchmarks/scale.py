"""Memory at scale: a 2-trial, 1-epoch search with 2 trials at once, at crops 32 and 96.

    python benchmarks/scale.py [--n 220000 --n-test 57000] [--crops 32 96]

Generates (or reuses) a Kaggle-layout synthetic set of ``--n`` train patches under
benchmarks/out/scale, builds its cache, then for each crop runs ``pcam-search --trials 2
--max-epochs 1 --folds 3 --concurrency 2 --no-asha`` on a one-param space fixed at that crop,
sampling every 0.5 s:

- machine memory in use above idle (MemTotal - MemAvailable, minus its value before the run);
- the PSS of the search's process tree (driver, Ray, trial workers; proportional set size:
  pages shared through the page cache are split between the processes that map them, not
  counted once per process as RSS would), and the largest single process's PSS;
- whether Ray spilled objects to disk (its spill folder under the session dir).

It prints them beside the train set's size (target: peak above idle <= 1.5x, nothing spilled),
the wall time to the first trial's report, and what a GPU trial would hold (computed).
Generating 220k patches takes minutes and ~13 GB of disk (TIFFs + cache).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "scale"
BIN = Path(sys.executable).parent
PATCH_BYTES = 96 * 96 * 3


def mem_in_use() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":")
        info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid: int, idle: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.idle = pid, idle
        self.peak_machine = self.peak_tree = self.peak_proc = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_machine = max(self.peak_machine, mem_in_use() - self.idle)
            per = [pss(p) for p in tree(self.pid)]
            self.peak_tree = max(self.peak_tree, sum(per))
            self.peak_proc = max(self.peak_proc, max(per, default=0))
            time.sleep(0.5)


def dataset(n: int, n_test: int) -> Path:
    d = OUT / f"kaggle-n{n}-t{n_test}"
    if not d.is_dir():
        t = time.perf_counter()
        subprocess.run(
            [
                str(BIN / "pcam-data"),
                "synth",
                "--out",
                str(d),
                "--n",
                str(n),
                "--n-test",
                str(n_test),
            ],
            check=True,
        )
        print(f"synth: {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    subprocess.run(
        [str(BIN / "pcam-data"), "build", str(d), "--cache-dir", str(OUT / "cache"), "--quiet"],
        check=True,
    )
    print(f"cache build (or reuse): {time.perf_counter() - t:.0f} s")
    return d


def _spill_files() -> int:
    """Files in Ray's object-spilling folders (default: <temp dir>/spill, and per session)."""
    roots = [Path("/tmp/ray/spill"), *Path("/tmp/ray").glob("session_*/ray_spilled_objects")]
    return sum(1 for r in roots if r.is_dir() for f in r.rglob("*") if f.is_file())


def one_crop(data: Path, crop: int, limit: float | None) -> dict:
    """The 2-trial search at ``crop``; Ctrl-C (SIGINT) after ``limit`` s when given (a 96 px
    epoch of 147k patches runs for most of an hour on 2 cores; memory peaks in its first
    minute, when both trials have mapped the pool and started training)."""
    space = OUT / f"space-{crop}.toml"
    space.write_text(
        f'[fixed]\narch = "simple_cnn"\nwidth = 16\ncrop = {crop}\nbatch_size = 128\n\n'
        '[params.lr]\ntype = "float"\nlow = 1e-3\nhigh = 3e-3\nlog = true\n'
    )
    studies = OUT / f"studies-{crop}"
    subprocess.run(["rm", "-rf", str(studies)], check=True)
    cmd = [
        str(BIN / "pcam-search"),
        "--data",
        str(data),
        "--cache-dir",
        str(OUT / "cache"),
        "--studies-dir",
        str(studies),
        "--space",
        str(space),
        "--trials",
        "2",
        "--max-epochs",
        "1",
        "--folds",
        "3",
        "--concurrency",
        "2",
        "--no-asha",
        "--no-progress",
        "--keep-top",
        "0",
    ]
    spill_before = _spill_files()
    r = timed(cmd, limit, first_marker=("trial", "after"))
    return {
        **r,
        "crop": crop,
        "stopped": limit is not None and r["rc"] == 130,
        "spilled": _spill_files() > spill_before,
    }


def timed(cmd: list[str], limit: float | None = None, first_marker: tuple = ()) -> dict:
    """Run ``cmd``, sampling memory; SIGINT it after ``limit`` seconds (None: to the end).
    ``first_report``: seconds to the first output line holding every ``first_marker`` word."""
    idle = mem_in_use()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    s = Sampler(proc.pid, idle)
    s.start()
    timer = None
    if limit is not None:
        timer = threading.Timer(limit, lambda: proc.send_signal(signal.SIGINT))
        timer.start()
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and first_marker and all(w in line for w in first_marker):
            first = time.perf_counter() - t0
    proc.wait()
    if timer is not None:
        timer.cancel()
    s.stop.set()
    s.join()
    return {
        "rc": proc.returncode,
        "wall": time.perf_counter() - t0,
        "first_report": first,
        "peak_machine": s.peak_machine,
        "peak_tree_pss": s.peak_tree,
        "peak_proc_pss": s.peak_proc,
        "tail": "".join(lines)[-2000:],
    }


# Folds over the whole pool with a slide map covering only part of the ids (the community map
# misses some Kaggle ids): patches without a slide become their own groups
PARTIAL_FOLDS = """
import sys, time, numpy as np
from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.folds import make_folds, slide_coverage
cache = open_dataset(DataConfig(data=sys.argv[1], cache_dir=sys.argv[2]), progress=False)
pool = cache.index.iloc[cache.labelled_pool()]
slides = pool["slide"].to_numpy(object).copy()
slides[np.random.default_rng(0).random(len(slides)) < float(sys.argv[3])] = None
t = time.perf_counter()
folds = make_folds(pool["label"].to_numpy(), slides, pool["hash"].to_numpy(), 3, 0)
print(f"{len(folds)} rows, coverage {slide_coverage(slides):.2f}: "
      f"{time.perf_counter() - t:.1f} s in make_folds, sizes {np.bincount(folds).tolist()}")
"""

# An ensemble of k = 3 untrained fold models (prediction cost and memory do not depend on the
# weights): what pcam-predict loads, with the data's fingerprint
MAKE_ENSEMBLE = """
import sys
from dataclasses import asdict
import models
from search.training.engine import TrainParams, create_model
from search.common.ensemble import save_ensemble
p = TrainParams.from_dict({"arch": "simple_cnn", "width": 16, "crop": int(sys.argv[2])})
norm = models.data_config(create_model(p), p.arch)
states = [create_model(p).state_dict() for _ in range(3)]
meta = {"arch": p.arch, "params": asdict(p), "crop": p.crop, "k": 3, "epochs": 0,
        "norm": {"mean": list(norm["mean"]), "std": list(norm["std"])}}
print(save_ensemble(sys.argv[1], states, meta))
"""


def other_steps(data: Path) -> None:
    """Folds (full and partial slide map), prediction of the test set with 8x TTA, the report
    of a study whose trials saw every patch: wall time and peak memory above idle."""
    cache = ["--cache-dir", str(OUT / "cache")]
    py = str(BIN / "python")
    steps = [
        (
            "pcam-data folds (k 3, full slide map)",
            [str(BIN / "pcam-data"), "folds", str(data), *cache, "--k", "3"],
        ),
        (
            "make_folds, 30% of ids without a slide",
            [py, "-c", PARTIAL_FOLDS, str(data), cache[1], "0.3"],
        ),
        (
            "ensemble of 3 fold models (48 px)",
            [py, "-c", MAKE_ENSEMBLE, str(OUT / "ensemble"), "48"],
        ),
        (
            "pcam-predict, 8x TTA",
            [
                str(BIN / "pcam-predict"),
                str(data),
                *cache,
                "--ensemble",
                str(OUT / "ensemble"),
                "--out",
                str(OUT / "preds.csv"),
                "--tta",
                "8",
                "--force",
            ],
        ),
        (
            "pcam-report (crop-32 study)",
            [
                str(BIN / "pcam-report"),
                "--studies-dir",
                str(OUT / "studies-32"),
                "--out",
                str(OUT / "report.html"),
            ],
        ),
    ]
    print("\n| step | wall s | peak above idle | tree PSS | rc |")
    print("|---|---:|---:|---:|---:|")
    for name, cmd in steps:
        r = timed(cmd)
        print(
            f"| {name} | {r['wall']:.0f} | {r['peak_machine'] / 1e9:.2f} GB | "
            f"{r['peak_tree_pss'] / 1e9:.2f} GB | {r['rc']} |",
            flush=True,
        )
        last = [ln for ln in r["tail"].splitlines() if ln.strip()][-1:]
        if r["rc"] != 0 or name.startswith("make_folds"):
            print(f"    {last[0] if last else ''}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=220_000)
    ap.add_argument("--n-test", type=int, default=57_000)
    ap.add_argument("--crops", type=int, nargs="+", default=[32, 96])
    ap.add_argument(
        "--limit",
        type=float,
        default=300,
        help="Ctrl-C a search at a crop above 32 after this many seconds (0: run to the end)",
    )
    ap.add_argument("--skip-steps", action="store_true", help="only the searches")
    args = ap.parse_args()
    data = dataset(args.n, args.n_test)
    train_gb = args.n * PATCH_BYTES / 1e9
    print(f"train set: {args.n} patches = {train_gb:.2f} GB of uint8")
    print(
        "| crop | peak above idle | x train set | tree PSS | largest process PSS | spilled "
        "| first report s | wall s |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for crop in args.crops:
        limit = args.limit if crop > 32 and args.limit > 0 else None
        r = one_crop(data, crop, limit)
        if r["rc"] != 0 and not r["stopped"]:
            sys.exit(f"crop {crop} failed:\n{r['tail']}")
        print(
            f"| {crop} | {r['peak_machine'] / 1e9:.2f} GB | "
            f"{r['peak_machine'] / 1e9 / train_gb:.2f} | {r['peak_tree_pss'] / 1e9:.2f} GB | "
            f"{r['peak_proc_pss'] / 1e9:.2f} GB | {'yes' if r['spilled'] else 'no'} | "
            f"{r['first_report'] or float('nan'):.0f} | {r['wall']:.0f}"
            f"{' (Ctrl-C at the limit)' if r['stopped'] else ''} |",
            flush=True,
        )
    for crop in args.crops:
        dev = args.n * crop * crop * 3 / 1e9
        print(
            f"a GPU trial at crop {crop} (computed): {dev:.2f} GB on the device for the cropped "
            f"pool when it fits in a quarter of the free memory (else batches of 128 x "
            f"{crop * crop * 3 / 1e3:.0f} kB); on the host only the shared page cache "
            f"({train_gb:.2f} GB per machine) and one batch"
        )
    print(f"(machine: {os.cpu_count()} CPUs)")
    if not args.skip_steps:
        other_steps(data)


if __name__ == "__main__":
    main()
