"""Data pipeline throughput: TIFF folder vs cache build vs random batches from the cache.

    python benchmarks/data_throughput.py [--n 4000] [--batches 2000]

Writes the embedded dataset in the Kaggle layout to a temp folder, then measures, side by side:
  (i)   reading the TIFF folder directly (PIL, one core): what a notebook's Dataset does
  (ii)  building the cache (parallel decode with all CPUs, and with 1 worker for the speed-up)
  (iii) random 256-patch batches from the memory-mapped cache (one core, warm page cache)
Targets: (iii) >= 100k patches/s and >= 100x (i); (ii) uses both cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline import cache, kaggle
from data_pipeline.synth import SynthConfig, write


def read_folder(root: Path) -> float:
    """Patches/s decoding every train TIFF once with PIL (one process)."""
    paths = sorted((root / "train").glob("*.tif"))
    t = time.perf_counter()
    for p in paths:
        kaggle.read_tiff(p)
    return len(paths) / (time.perf_counter() - t)


def build(root: Path, cache_root: Path, workers: int) -> float:
    """Patches/s of a full cache build (scan, decode, hash, validate, write)."""
    t = time.perf_counter()
    path = cache.build_cache(root, cache_root, workers=workers, progress=False, rebuild=True)
    dt = time.perf_counter() - t
    return cache.load_cache(path).meta["n"] / dt


def random_batches(cache_dir: Path, batches: int, batch: int = 256, seed: int = 0) -> float:
    """Patches/s of random batches gathered from the memmap into a contiguous array."""
    images = cache.load_cache(cache_dir).images
    rng = np.random.default_rng(seed)
    n = len(images)
    images[rng.integers(0, n, 4096)].sum()  # warm the page cache once
    t = time.perf_counter()
    for _ in range(batches):
        idx = np.sort(rng.integers(0, n, batch))  # sorted: sequential-ish reads from the file
        images[idx]
    return batches * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="train patches (test adds n/4)")
    ap.add_argument("--batches", type=int, default=2000)
    args = ap.parse_args()
    cpus = cache.available_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        root = write(Path(tmp) / "kaggle", SynthConfig(n=args.n), "kaggle")
        cache_root = Path(tmp) / "cache"
        read_folder(root)  # warm the page cache so (i) measures decoding, not the disk
        r_folder = read_folder(root)
        r_build1 = build(root, cache_root, workers=1)
        r_build = build(root, cache_root, workers=cpus)
        path = cache.build_cache(root, cache_root, workers=cpus, progress=False)
        r_batch = random_batches(path, args.batches)
    rows = [
        ("(i) read TIFF folder (PIL, 1 core)", r_folder, 1.0),
        ("(ii) build cache, 1 worker", r_build1, r_build1 / r_folder),
        (f"(ii) build cache, {cpus} workers", r_build, r_build / r_folder),
        ("(iii) random 256-batches from cache (1 core)", r_batch, r_batch / r_folder),
    ]
    print(f"data throughput, {args.n + args.n // 4} patches, {cpus} CPUs, {os.uname().machine}")
    print(f"| {'step':<46} | {'patches/s':>10} | {'vs (i)':>8} |")
    print(f"|{'-' * 48}|{'-' * 12}:|{'-' * 9}:|")
    for name, rate, ratio in rows:
        print(f"| {name:<46} | {rate:>10,.0f} | {ratio:>7.1f}x |")
    print(f"build speed-up from {cpus} workers: {r_build / r_build1:.2f}x")


if __name__ == "__main__":
    main()
