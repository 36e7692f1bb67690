"""Training throughput: the engine vs a minimal hand-written PyTorch loop, side by side.

    python benchmarks/train_throughput.py [--arch simple_cnn --crop 64 --batch 128 --steps 60]

Both train the same model (same arch, batch size, crop, thread count, augmentation off) on the
same cached patches; the engine's number is its own ``epoch_images_per_s`` for the 2nd epoch
of 2-fold lockstep training (which includes its batching, normalisation and schedule), the
baseline is a bare ``for step: x[idx] -> forward -> backward -> step`` loop on a pre-cropped
copy. The engine runs twice: batches gathered from the cache's memory-mapped file (what the
search does: one copy of the data per machine) and from a copy of the rows in RAM. Target:
ratio >= 0.95 on CPU. With CUDA it also prints AMP + channels_last img/s for simple_cnn and
resnet50 at 96x96 (target for resnet50 on an H100: >= 10,000 img/s).

Then the engine in fp32 (``PCAM_AMP=off``) against the engine in its own precision (bf16
autocast on a CPU with AMX units or a GPU; ``search.training.engine.precision``), same runs
interleaved, at crops 32/48/64 (``--precision-crops``): what the CPU bf16 rule buys.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import models
from data_pipeline import build_cache, load_cache
from data_pipeline.synth import SynthConfig, write
from search.training.augment import augment
from search.training.batches import crop_batch
from search.training.device import amp_dtype
from search.training.engine import AMP_ENV, PoolImages, TrainData, precision, train_cv
from search.training.fold import resolve_device


def baseline(
    arch: str, data: TrainData, crop: int, batch: int, steps: int, dev, aug: float = 0.0
) -> float:
    """img/s of the plainest correct loop: random batch -> normalise -> fwd/bwd -> AdamW
    (``aug`` > 0: the same batch augmentation the engine applies, ``search.training.augment``), in
    the engine's autocast dtype for ``dev``."""
    torch.manual_seed(0)
    m = models.create(arch).to(dev, memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    amp = amp_dtype(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = crop_batch(data.images, crop).to(dev)
    y = torch.as_tensor(data.labels, dtype=torch.float32, device=dev)
    norm = models.data_config(m, arch)
    mean = torch.tensor(norm["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"], device=dev).view(1, 3, 1, 1)
    m.train()

    def step() -> None:
        idx = torch.randint(0, len(x), (batch,), device=dev)
        # NHWC uint8 permuted to NCHW view = channels_last memory, like the engine's input
        xb = x[idx].permute(0, 3, 1, 2).float() / 255
        xb = (augment(xb, aug) - mean) / std if aug > 0 else (xb - mean) / std
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = F.binary_cross_entropy_with_logits(m(xb).squeeze(1).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (allocator, cudnn autotune)
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def engine(
    arch: str,
    data: TrainData,
    crop: int,
    batch: int,
    steps: int,
    dev,
    mapped: bool = True,
    aug: float = 0.0,
) -> float:
    """img/s the engine reports for its 2nd lockstep epoch of 2 folds (the 1st is its warm-up:
    first-call oneDNN/cuDNN setup, as the baseline's warm-up steps), ~``steps`` steps each.
    ``mapped``: batches gather from the cache's memory-mapped file (what the search does);
    else from a copy of the rows in RAM."""
    n = min(len(data.labels), 2 * steps * batch)  # each fold trains on half: ~steps steps
    pool = PoolImages(data.images.path, data.images.rows[:n])
    sub = TrainData(pool if mapped else np.asarray(pool), data.labels[:n])
    folds = np.arange(n) % 2
    params = {"arch": arch, "crop": crop, "batch_size": batch, "aug": aug, "dropout": 0.0}
    r = train_cv(params, sub, folds, epochs=2, device=dev, threads=torch.get_num_threads())
    return r.final["epoch_images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="simple_cnn")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n", type=int, default=8000, help="patches in the embedded set")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians shown")
    ap.add_argument("--precision-crops", type=int, nargs="*", default=[32, 48, 64])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device()
    with tempfile.TemporaryDirectory() as tmp:
        src = write(Path(tmp) / "k", SynthConfig(n=args.n, n_test=8), "kaggle")
        cache = load_cache(build_cache(src, Path(tmp) / "c", progress=False))
        data = TrainData.from_cache(cache)  # memory-mapped: measure inside the folder's life
        rows = measure(args, data, dev)
        prec = measure_precision(args, data, dev)
    name = (
        torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    print(f"training throughput on {name} (torch {torch.__version__})")
    print(
        f"| {'model':<12} | crop | batch | {'minimal loop':>12} | {'engine, RAM':>11} | "
        f"{'engine, mapped':>14} | mapped / loop | mapped / RAM |"
    )
    dashes = "|".join("-" * w + ":" for w in (13, 12, 15, 14, 13))
    print(f"|{'-' * 14}|-----:|------:|{dashes}|")
    for arch, crop, batch, b, r, e in rows:
        print(
            f"| {arch:<12} | {crop:>4} | {batch:>5} | {b:>12,.0f} | {r:>11,.0f} | {e:>14,.0f} |"
            f" {e / b:>13.2f} | {e / r:>12.2f} |"
        )
    own = precision(dev)
    print(f"\nengine, fp32 ({AMP_ENV}=off) vs its own precision here ({own}), mapped pool")
    print(f"| model | crop | batch | engine fp32 | engine {own} | {own} / fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch, crop, batch, f32, auto in prec:
        print(f"| {arch} | {crop} | {batch} | {f32:,.0f} | {auto:,.0f} | {auto / f32:.2f} |")


def measure(args, data: TrainData, dev) -> list[tuple]:
    """Medians of interleaved repeats (a shared 2-core machine drifts by 10-20% run to run):
    the minimal loop on a pre-cropped copy, the engine from RAM, the engine from the map."""
    rows = []
    configs = [(args.arch, args.crop, args.batch)]
    if dev.type == "cuda":
        configs += [("simple_cnn", 96, 256), ("resnet50", 96, 256)]
    for arch, crop, batch in configs:
        bs, rs, es = [], [], []
        for _ in range(args.repeats):
            bs.append(baseline(arch, data, crop, batch, args.steps, dev))
            rs.append(engine(arch, data, crop, batch, args.steps, dev, mapped=False))
            es.append(engine(arch, data, crop, batch, args.steps, dev, mapped=True))
        rows.append((arch, crop, batch, *(float(np.median(v)) for v in (bs, rs, es))))
    return rows


def _with_amp(value: str | None, fn, *args, **kw):
    """``fn`` with ``PCAM_AMP`` set to ``value`` (None: unset); the engine reads it once per
    process, so its cached answer is cleared around the call."""
    old = os.environ.pop(AMP_ENV, None)
    if value is not None:
        os.environ[AMP_ENV] = value
    amp_dtype.cache_clear()
    try:
        return fn(*args, **kw)
    finally:
        os.environ.pop(AMP_ENV, None)
        if old is not None:
            os.environ[AMP_ENV] = old
        amp_dtype.cache_clear()


def measure_precision(args, data: TrainData, dev) -> list[tuple]:
    """Medians of interleaved engine runs in fp32 and in the engine's own precision."""
    rows = []
    for crop in args.precision_crops:
        f32, auto = [], []
        run = (engine, args.arch, data, crop, args.batch, args.steps, dev)
        for _ in range(args.repeats):
            f32.append(_with_amp("off", *run))
            auto.append(_with_amp(None, *run))
        rows.append((args.arch, crop, args.batch, float(np.median(f32)), float(np.median(auto))))
    return rows


if __name__ == "__main__":
    main()
