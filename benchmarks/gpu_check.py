"""GPU check, part 1: the device's facts and the engine's training throughput against a bare
PyTorch loop, side by side, with peak memory against the memory plan's estimate.

    python benchmarks/gpu_check.py --out DIR [--steps 30] [--dry-run]

For resnet50 at 96 px and simple_cnn at 64 px, augmentation 0 and 0.5, batch 256: the bare
loop (random batch from a pre-cropped device copy -> augment -> fwd/bwd -> AdamW, in the
engine's autocast dtype) and the engine (``train_cv``, 2 folds, lockstep; its 2nd epoch's
img/s; the pool where the memory plan puts it). Writes ``DIR/throughput.md`` and
``DIR/throughput.json``. Targets on an H100/H200 class GPU: engine >= 0.9 x the bare loop;
resnet50@96 >= 10,000 img/s. ``benchmarks/gpu_check.sh`` runs this, then a 4-trial search.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_throughput beside this file

CONFIGS = [("resnet50", 96), ("simple_cnn", 64)]
AUGS = (0.0, 0.5)
BATCH = 256


def facts() -> dict:
    """What the machine is: torch, CUDA, the GPU, and the precision the engine picks."""
    from search.training.device import precision

    d: dict = {"torch": torch.__version__, "cuda_build": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        d.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
            precision=precision("cuda"),
        )
    else:
        d.update(gpu=None, precision=precision("cpu"))
    return d


def _pool(tmp: Path, n: int) -> object:
    """``n`` PCam-like patches as a memory-mapped cache file (what trials read): 2,048
    generated ones, tiled (throughput does not depend on which pixels)."""
    from data_pipeline.synth import SynthConfig, generate
    from search.training.engine import PoolImages, TrainData

    made = generate(2048, 0, "gpu_check", SynthConfig(n=2048))
    reps = -(-n // len(made.images))
    path = tmp / "images.npy"
    np.save(path, np.concatenate([made.images] * reps)[:n])
    labels = np.concatenate([made.labels] * reps)[:n].astype(np.int64)
    return TrainData(PoolImages(path, np.arange(n)), labels)


def measure(data, steps: int, dev: torch.device) -> list[dict]:
    """One row per (arch, crop, aug): bare loop and engine img/s, peak memory, estimate."""
    from train_throughput import baseline, engine

    import models
    from search.training.device import estimate_trial_bytes

    rows = []
    for arch, crop in CONFIGS:
        with torch.device("meta"):
            meta = models.create(arch).to(memory_format=torch.channels_last)
        est = estimate_trial_bytes(meta, "adamw", False, 2, BATCH, crop)
        for aug in AUGS:
            t0 = time.perf_counter()
            bare = baseline(arch, data, crop, BATCH, steps, dev, aug=aug)
            torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
            eng = engine(arch, data, crop, BATCH, steps, dev, mapped=True, aug=aug)
            peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
            rows.append(
                {
                    "arch": arch,
                    "crop": crop,
                    "aug": aug,
                    "batch": BATCH,
                    "bare_img_s": round(bare),
                    "engine_img_s": round(eng),
                    "ratio": round(eng / bare, 3),
                    "peak_gib": round(peak / 2**30, 2),
                    "estimate_gib": round(est / 2**30, 2),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def table(f: dict, rows: list[dict]) -> str:
    head = (
        f"GPU check on {f.get('gpu') or 'CPU'} (capability {f.get('capability', '-')}, "
        f"{f.get('memory_gib', '-')} GiB), torch {f['torch']} (CUDA {f['cuda_build']}), "
        f"precision {f['precision']}\n\n"
        "| model | crop | aug | batch | bare loop img/s | engine img/s | engine / bare | "
        "peak GiB (engine, 2 folds) | plan's estimate GiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['arch']} | {r['crop']} | {r['aug']} | {r['batch']} | {r['bare_img_s']:,} | "
        f"{r['engine_img_s']:,} | {r['ratio']:.2f} | {r['peak_gib']} | {r['estimate_gib']} |\n"
        for r in rows
    )
    return head + body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30, help="training steps per measurement")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = ap.parse_args()
    if args.dry_run:
        for arch, crop in CONFIGS:
            for aug in AUGS:
                print(
                    f"would measure {arch}@{crop} aug {aug} batch {BATCH}: bare loop vs engine, "
                    f"{args.steps} steps, peak memory vs the plan's estimate"
                )
        print(f"would write {args.out}/throughput.md and {args.out}/throughput.json")
        return 0
    from search.training.fold import resolve_device

    dev = resolve_device()
    args.out.mkdir(parents=True, exist_ok=True)
    f = facts()
    print(json.dumps(f), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = _pool(Path(tmp), 2 * args.steps * BATCH)
        rows = measure(data, args.steps, dev)
    (args.out / "throughput.json").write_text(json.dumps({"facts": f, "rows": rows}, indent=1))
    (args.out / "throughput.md").write_text(table(f, rows))
    print(table(f, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
