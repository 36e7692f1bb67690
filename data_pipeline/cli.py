"""``pcam-data``: generate the embedded dataset, check a dataset, build its cache and folds.

pcam-data synth --out data/demo [--n 4000 --seed 0 --layout kaggle|pcam] [--tumour-signal 0.5 ...]
pcam-data check data/demo            # report problems; exit 1 if any
pcam-data build [DIR] [--skip-bad]   # build the cache (embedded dataset without DIR)
pcam-data folds [DIR] --k 5 --seed 0 # make/save the CV folds and print their balance
pcam-data slide-map KAGGLE PCAM      # rebuild KAGGLE/patch_id_wsi.csv from PCam's meta CSVs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_pipeline import cache as cache_mod
from data_pipeline.archive import resolve_source
from data_pipeline.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    add_cache_dir,
    add_no_progress,
)
from data_pipeline.constants import FOLD_SEED, FOLDS_CPU, FOLDS_GPU
from data_pipeline.dataset import DataConfig, open_dataset
from data_pipeline.folds import (
    STRATEGIES,
    folds_file,
    folds_for_cache,
    slide_coverage,
    slide_map_warning,
)
from data_pipeline.problems import DataError, summarize, to_csv_text
from data_pipeline.slide_map import build_slide_map
from data_pipeline.synth import SynthConfig, write
from data_pipeline.version import DefaultsFormatter, add_version, help_text


def _add_data_args(p: argparse.ArgumentParser, optional_dir: bool = True) -> None:
    if optional_dir:
        p.add_argument(
            "data",
            nargs="?",
            type=Path,
            default=None,
            help="Kaggle or PCam folder (default: the embedded synthetic dataset)",
        )
    else:
        p.add_argument("data", type=Path, help="Kaggle or PCam folder (required)")
    add_cache_dir(p)
    p.add_argument(
        "--workers", type=int, default=None, help="decode processes (default: all available CPUs)"
    )
    add_no_progress(p, "no progress bar")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pcam-data",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "synth",
        help="write the embedded synthetic dataset in a real layout",
        formatter_class=DefaultsFormatter,
    )
    d = SynthConfig()
    s.add_argument("--out", type=Path, required=True, help="folder to create")
    s.add_argument("--n", type=int, default=d.n, help="train patches")
    s.add_argument("--n-test", type=int, default=None, help="test patches (default: n/4)")
    s.add_argument("--seed", type=int, default=d.seed, help="generator seed")
    s.add_argument(
        "--layout", choices=["kaggle", "pcam"], default="kaggle", help="the folder layout to write"
    )
    s.add_argument(
        "--patches-per-slide", type=int, default=d.patches_per_slide, help="crops per slide"
    )
    s.add_argument("--flip-rate", type=float, default=d.flip_rate, help="label noise share")
    s.add_argument(
        "--tumour-signal",
        type=float,
        default=d.tumour_signal,
        help="tumour vs normal nuclei difference (1 = embedded set, 0.5 = weaker)",
    )
    s.add_argument(
        "--stain-range",
        type=float,
        default=d.stain_range,
        help="per-slide stain variation (1 = embedded set, 2 = twice the spread)",
    )

    c = sub.add_parser("check", help="validate a dataset folder without building anything")
    _add_data_args(c, optional_dir=False)
    c.add_argument("--report", type=Path, default=None, help="also write the problems as CSV")

    b = sub.add_parser("build", help="build (or find) the cache of a dataset")
    _add_data_args(b)
    b.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad rows out (listed in report.csv beside the cache) instead of stopping",
    )
    b.add_argument("--rebuild", action="store_true", help="rebuild even if a cache exists")

    m = sub.add_parser(
        "slide-map",
        help="rebuild a Kaggle folder's patch_id_wsi.csv from the PCam release (pixel hashes)",
    )
    m.add_argument("kaggle", type=Path, help="the Kaggle folder (train/, train_labels.csv)")
    m.add_argument("pcam", type=Path, help="the PCam folder (*_x.h5[.gz] and *_meta.csv)")
    add_cache_dir(m)
    m.add_argument("--workers", type=int, default=None, help="decode processes")
    add_no_progress(m, "no progress bar")
    m.add_argument("--force", action="store_true", help="replace an existing patch_id_wsi.csv")

    f = sub.add_parser(
        "folds",
        help="make and save the cross-validation folds",
        formatter_class=DefaultsFormatter,
    )
    _add_data_args(f)
    f.add_argument("--skip-bad", action="store_true", help="leave bad rows out of the cache")
    f.add_argument(
        "--k",
        type=int,
        default=None,
        help=f"number of folds (default: pcam-search's: {FOLDS_CPU}, {FOLDS_GPU} with a GPU)",
    )
    f.add_argument("--seed", type=int, default=FOLD_SEED, help="fold assignment seed")
    f.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=STRATEGIES[0],
        help="slide = grouped by slide (honest); random = patch-level (leaky)",
    )
    return ap


def _search_folds() -> int:
    """pcam-search's default k on this machine (the folds it will use)."""
    import torch  # only here: the other commands need no torch

    return FOLDS_GPU if torch.cuda.is_available() else FOLDS_CPU


def _config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        data=args.data,
        cache_dir=args.cache_dir,
        skip_bad=getattr(args, "skip_bad", False),
        workers=args.workers,
    )


def _warn_slides(slides: np.ndarray | list[str]) -> None:
    """Say plainly when slide folds would really be patch folds (no or a small slide map)."""
    warn = slide_map_warning(slide_coverage(slides))
    if warn:
        print(f"warning: {warn}", file=sys.stderr)


def _synth(args: argparse.Namespace) -> int:
    synth = SynthConfig(
        n=args.n,
        n_test=args.n_test,
        seed=args.seed,
        patches_per_slide=args.patches_per_slide,
        flip_rate=args.flip_rate,
        tumour_signal=args.tumour_signal,
        stain_range=args.stain_range,
    )
    out = write(args.out, synth, args.layout)
    print(
        f"wrote {synth.n} train + {synth.test_count} test patches ({args.layout} layout) to {out}"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    problems = cache_mod.check(
        args.data, cfg.cache_root, args.workers, progress=not args.no_progress
    )
    print(summarize(problems, args.data))
    try:
        work = cfg.cache_root / "unpacked"
        _, entries, _ = cache_mod.scan(resolve_source(Path(args.data), work, False), work)
        _warn_slides(entries.loc[entries["split"] != "test", "slide"].to_numpy())
    except DataError:  # unusable as a whole: the summary above already says why
        pass
    if args.report:
        args.report.write_text(to_csv_text(problems))
        print(f"report written to {args.report}")
    return 1 if problems else 0


def _slide_map(args: argparse.Namespace) -> int:
    r = build_slide_map(
        args.kaggle, args.pcam, args.cache_dir, args.workers, not args.no_progress, args.force
    )
    print(
        f"wrote {r.path}: {r.mapped_train} of {r.train} train ids ({r.coverage:.1%}) and "
        f"{r.mapped_test} of {r.test} test ids matched a PCam patch with a slide; "
        f"{r.ambiguous} pixel hash(es) on two slides left out"
    )
    _warn_slides([""] * (r.train - r.mapped_train) + ["x"] * r.mapped_train)
    return 0


def _build(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.rebuild:
        path = cache_mod.build_cache(
            cfg.source(),
            cfg.cache_root,
            cfg.skip_bad,
            cfg.workers,
            not args.no_progress,
            rebuild=True,
        )
        cache = cache_mod.load_cache(path)
    else:
        cache = open_dataset(cfg, progress=not args.no_progress)
    m = cache.meta
    print(f"cache: {cache.path}")
    print(
        f"  {m['n']} patches {m['splits']}, labels {m['labels']}, "
        f"{m['slides']} with a slide id, built in {m['build_seconds']} s"
    )
    if m["skipped"]:
        print(f"  skipped {m['skipped']} bad rows: see {cache.path / 'report.csv'}")
    _warn_slides(cache.index["slide"].to_numpy()[cache.labelled_pool()])
    return 0


def _folds(args: argparse.Namespace) -> int:
    cache = open_dataset(_config(args), progress=not args.no_progress)
    k = args.k or _search_folds()
    folds_for_cache(cache, k, args.seed, args.strategy)
    summary = folds_file(cache, k, args.seed, args.strategy).with_suffix(".json")
    print(f"folds: {summary.with_suffix('.csv')}")
    if args.strategy == "slide":
        _warn_slides(cache.index["slide"].to_numpy()[cache.labelled_pool()])
    print(json.dumps(json.loads(summary.read_text())["per_fold"], indent=1))
    return 0


COMMANDS = {
    "synth": _synth,
    "check": _check,
    "slide-map": _slide_map,
    "build": _build,
    "folds": _folds,
}


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command; returns the exit code."""
    return COMMANDS[args.cmd](args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written is left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
