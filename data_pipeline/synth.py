"""The embedded dataset: deterministic, H&E-like 96x96 patches cut from synthetic slides.

How a slide is drawn (all on a 256x256 canvas, numpy + scipy only):
- Stroma: an eosin (pink) concentration field from smoothed noise, with white gaps (fat/lumen).
- Nuclei: hematoxylin (purple) blobs, three kinds - sparse small stroma nuclei, dense very small
  dark lymphocyte clusters (hard negatives), and tumour nuclei (larger, darker, crowded) inside
  tumour regions of "tumour slides" only. Tumour nucleus size/darkness vary per slide and
  overlap the normal range, so the task is not trivially separable.
- Colour: Beer-Lambert mixing of H and E with per-slide stain vectors, stain strength and
  brightness (a scanner/lab effect), plus per-patch sensor noise (no two patches share pixels).

Patches are overlapping 96x96 crops of a slide; label 1 iff a tumour nucleus centre lies in the
centre 32x32 (PCam's rule). Crops with tumour only in the outer ring are hard negatives. A few
labels are flipped (annotation noise). Test patches come from slides not in train.

``write(out, layout=...)`` writes the set in the real Kaggle layout (TIFFs + CSVs +
``patch_id_wsi.csv`` covering most ids, + ``test_labels.csv``) or the PCam HDF5 layout, so the
same readers as for real data are exercised on the default path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

GENERATOR_VERSION = 1
CANVAS = 256  # px; 96 px crops of a 256 px canvas overlap heavily, as PCam crops of a slide do
PATCH = 96
# Beer-Lambert optical density per unit stain for (R, G, B) (Ruifrok & Johnston, H&E).
H_OD = np.array([0.65, 0.70, 0.29])
E_OD = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Same config -> byte-identical dataset."""

    n: int = 4000  # train patches (test adds n_test more, from other slides)
    n_test: int | None = None  # default n // 4
    seed: int = 0
    patches_per_slide: int = 32  # crops per slide: more = more overlap and slide leakage
    tumour_slide_frac: float = 0.6  # slides with tumour regions; the rest are normal
    flip_rate: float = 0.02  # fraction of labels flipped (annotation noise), train and test
    slide_map_coverage: float = 0.85  # share of train ids listed in patch_id_wsi.csv
    # difficulty knobs (1.0 = the embedded set; the defaults leave its bytes unchanged):
    tumour_signal: float = 1.0  # how far tumour nuclei differ from stroma ones in size and
    # darkness: 0.5 = halfway to normal nuclei (a weaker signal), 0 = only crowding differs
    stain_range: float = 1.0  # per-slide stain/scanner variation: 2.0 = twice the spread

    @property
    def test_count(self) -> int:
        return self.n // 4 if self.n_test is None else self.n_test


@dataclass
class Patches:
    """Generated patches: images (N, 96, 96, 3) uint8 and aligned per-patch metadata."""

    images: np.ndarray
    labels: np.ndarray  # int8, after label noise
    true_labels: np.ndarray  # int8, before label noise
    slides: list[str]
    coords: np.ndarray  # (N, 2) top-left (y, x) on the slide canvas
    tumour_any: np.ndarray  # bool: any tumour nucleus anywhere in the patch


def _smooth(rng: np.random.Generator, sigma: float, size: int = CANVAS) -> np.ndarray:
    """Smoothed gaussian noise normalised to zero mean, unit std: (size, size) float32.

    Wide fields (sigma >= 4 px) are drawn at 1/4 resolution and upsampled: same look, ~10x less
    filtering time (the generator's hot spot).
    """
    if sigma >= 4:
        small = rng.standard_normal((size // 4, size // 4), dtype=np.float32)
        f = ndimage.zoom(ndimage.gaussian_filter(small, sigma / 4, mode="wrap"), 4, order=3)
    else:
        f = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma)
    return (f - f.mean()) / (f.std() + 1e-8)


def _nuclei(
    rng: np.random.Generator,
    density: np.ndarray,
    sigma: float,
    amp: float,
    amp_jitter: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Blobs at Poisson points with per-pixel ``density`` (nuclei/px); returns (H map, centres).

    A gaussian of std ``sigma`` px is scaled so its peak is ~``amp``, then squashed so nuclei
    look like filled discs with soft edges rather than fuzzy spots.
    """
    pts = rng.random(density.shape) < density
    ys, xs = np.nonzero(pts)
    impulses = np.zeros(density.shape, np.float32)
    impulses[ys, xs] = amp * (1 + amp_jitter * rng.standard_normal(len(ys)))
    blob = ndimage.gaussian_filter(impulses, sigma) * (2 * np.pi * sigma**2)
    return np.tanh(1.6 * blob), np.stack([ys, xs], axis=1)


def _toward(value: float, centre: float, scale: float) -> float:
    """``value`` pulled toward (scale < 1) or pushed away from (> 1) ``centre``; exact at 1."""
    return value if scale == 1.0 else centre + scale * (value - centre)


def _slide(rng: np.random.Generator, tumour: bool, cfg: SynthConfig = SynthConfig()) -> dict:
    """Draw one slide canvas: returns RGB float image, tumour-nucleus centres, lymph mask."""
    # tissue: eosin concentration with white gaps (~12% of area)
    tissue = _smooth(rng, 10)
    eosin = np.clip(0.55 + 0.22 * _smooth(rng, 3), 0.05, 1.0) * (tissue > -1.2)
    eosin += 0.08 * rng.random(eosin.shape).astype(np.float32)  # fibre texture
    # stroma nuclei: sparse, small; size varies per slide
    h = np.zeros((CANVAS, CANVAS), np.float32)
    s_sig = rng.uniform(1.2, 2.0)
    blobs, _ = _nuclei(rng, np.full(h.shape, 0.0025) * (tissue > -1.2), s_sig, 0.8)
    h += blobs
    # lymphocyte clusters: dense tiny dark nuclei (hard negatives), on every slide
    lymph_field = _smooth(rng, 12)
    lymph = lymph_field > rng.uniform(1.0, 1.6)
    blobs, _ = _nuclei(rng, 0.03 * lymph, rng.uniform(1.0, 1.4), 1.3)
    h += blobs
    centres = np.zeros((0, 2), int)
    if tumour:
        t_field = _smooth(rng, 14)
        thr = rng.uniform(0.0, 0.9)
        # density ramps up from the region border: sparse tumour cells make borderline patches
        dens = 0.010 * np.clip((t_field - thr) / 0.6, 0, 1) * (tissue > -1.2)
        # per-slide tumour appearance overlapping the normal range (sizes in px std)
        t_sig = _toward(rng.uniform(1.7, 3.0), s_sig, cfg.tumour_signal)
        t_amp = _toward(rng.uniform(0.8, 1.3), 0.8, cfg.tumour_signal)  # stroma nuclei: 0.8
        blobs, centres = _nuclei(rng, dens, t_sig, t_amp, amp_jitter=0.4)
        h += blobs
        # chromatin texture inside tumour nuclei
        h += 0.15 * blobs * rng.standard_normal(h.shape).astype(np.float32)
        eosin *= 1 - 0.3 * np.clip((t_field - thr) / 0.6, 0, 1)  # less stroma among tumour
    # per-slide stain and scanner: stain vectors, stain strength, brightness
    st = cfg.stain_range
    h_od = H_OD * np.array([_toward(u, 1.0, st) for u in rng.uniform(0.8, 1.2, 3)])
    e_od = E_OD * np.array([_toward(u, 1.0, st) for u in rng.uniform(0.8, 1.2, 3)])
    h_amt = _toward(rng.uniform(0.8, 1.3), 1.05, st)  # stain strength: H, then E
    e_amt = _toward(rng.uniform(0.6, 1.2), 0.9, st)
    od = np.clip(h, 0, 1.6)[..., None] * np.clip(h_od, 0.05, None) * max(h_amt, 0.1) + eosin[
        ..., None
    ] * np.clip(e_od, 0.05, None) * max(e_amt, 0.1)
    rgb = _toward(rng.uniform(215, 245), 230, st) * np.exp(-1.4 * od)
    rgb = ndimage.gaussian_filter(rgb, sigma=(0.6, 0.6, 0))  # optics blur
    return {"rgb": rgb.astype(np.float32), "centres": centres, "lymph": lymph}


def _crop_positions(rng: np.random.Generator, slide: dict, k: int) -> np.ndarray:
    """``k`` distinct top-left corners; some aimed at tumour or lymph areas (hard cases)."""
    hi = CANVAS - PATCH
    pos: set[tuple[int, int]] = set()
    lymph_pts = np.argwhere(slide["lymph"])
    tries = 0
    while len(pos) < k and tries < 50 * k:
        tries += 1
        u = rng.random()
        if u < 0.55 and len(slide["centres"]):
            # aim a tumour nucleus near the centre, or (1 in 3) just outside it: outer-ring cases
            c = slide["centres"][rng.integers(len(slide["centres"]))]
            off = (
                rng.integers(-14, 15, 2)
                if rng.random() < 0.66
                else rng.integers(24, 44, 2) * rng.choice([-1, 1], 2)
            )
            y, x = c - PATCH // 2 + off
        elif u < 0.75 and len(lymph_pts):
            y, x = lymph_pts[rng.integers(len(lymph_pts))] - PATCH // 2 + rng.integers(-16, 17, 2)
        else:
            y, x = rng.integers(0, hi + 1, 2)
        pos.add((int(np.clip(y, 0, hi)), int(np.clip(x, 0, hi))))
    return np.array(sorted(pos))


def _label(centres: np.ndarray, y: int, x: int) -> tuple[int, bool]:
    """(label, any tumour in patch): label 1 iff a tumour nucleus centre is in the centre 32x32."""
    if not len(centres):
        return 0, False
    cy, cx = centres[:, 0] - y, centres[:, 1] - x
    inside = (cy >= 0) & (cy < PATCH) & (cx >= 0) & (cx < PATCH)
    centre = (cy >= 32) & (cy < 64) & (cx >= 32) & (cx < 64)
    return int(centre.any()), bool(inside.any())


def slides(n: int, seed: int, slide_prefix: str, cfg: SynthConfig) -> Iterator[Patches]:
    """The ``n`` patches, one slide at a time (peak memory: one slide canvas and its crops);
    ``labels`` carry the label noise (``flips``), decided up front from the seed."""
    flipped = flips(n, seed, cfg)
    done, s = 0, 0
    while done < n:
        rng = np.random.default_rng([seed, s])
        tumour = rng.random() < cfg.tumour_slide_frac
        slide = _slide(rng, tumour, cfg)
        name = f"{slide_prefix}_{'tumor' if tumour else 'normal'}_{s:03d}"
        imgs, labels, coords, anyt = [], [], [], []
        for y, x in _crop_positions(rng, slide, min(cfg.patches_per_slide, n - done)):
            crop = slide["rgb"][y : y + PATCH, x : x + PATCH]
            # sensor noise (std 3 grey levels): every patch unique, overlaps not identical
            crop = crop + 3.0 * rng.standard_normal(crop.shape, dtype=np.float32)
            imgs.append(np.clip(np.rint(crop), 0, 255).astype(np.uint8))
            lab, a = _label(slide["centres"], y, x)
            labels.append(lab)
            anyt.append(a)
            coords.append((y, x))
        s += 1
        if not imgs:
            continue
        true = np.array(labels, np.int8)
        noisy = np.where(flipped[done : done + len(true)], 1 - true, true).astype(np.int8)
        yield Patches(
            np.stack(imgs), noisy, true, [name] * len(true), np.array(coords), np.array(anyt)
        )
        done += len(true)


def flips(n: int, seed: int, cfg: SynthConfig) -> np.ndarray:
    """(n,) bool: which patches get their label flipped (annotation noise)."""
    rng = np.random.default_rng([seed, 10**6])
    out = np.zeros(n, bool)
    out[rng.choice(n, size=int(round(cfg.flip_rate * n)), replace=False)] = True
    return out


def generate(n: int, seed: int, slide_prefix: str, cfg: SynthConfig) -> Patches:
    """``n`` patches from ceil(n / patches_per_slide) slides, deterministically from ``seed``,
    all in memory (the Kaggle writer streams ``slides`` instead)."""
    parts = list(slides(n, seed, slide_prefix, cfg))
    return Patches(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.true_labels for p in parts]),
        [name for p in parts for name in p.slides],
        np.concatenate([p.coords for p in parts]),
        np.concatenate([p.tumour_any for p in parts]),
    )


TEST_SEED_OFFSET = 7919  # test slides come from their own seed stream


def make(cfg: SynthConfig) -> tuple[Patches, Patches]:
    """(train, test) patches; test slides are disjoint from train slides."""
    train = generate(cfg.n, cfg.seed, "synth_train", cfg)
    # a distinct seed stream for test slides: no slide (or crop) is shared with train. Test
    # labels carry the same annotation noise as train (as real test labels do), so CV and
    # test AUC measure the same thing.
    test = generate(cfg.test_count, cfg.seed + TEST_SEED_OFFSET, "synth_test", cfg)
    return train, test


def _ids(prefix: str, n: int, seed: int) -> list[str]:
    """Kaggle-style ids: 40 hex chars, unique, deterministic."""
    return [hashlib.sha1(f"{prefix}-{seed}-{i}".encode()).hexdigest() for i in range(n)]


def _write_kaggle(out: Path, cfg: SynthConfig) -> None:
    """The Kaggle layout, streamed slide by slide: peak memory does not grow with ``n``."""
    (out / "train").mkdir(parents=True)
    (out / "test").mkdir()
    tr_ids, te_ids = _ids("train", cfg.n, cfg.seed), _ids("test", cfg.test_count, cfg.seed)
    labels, slide_of = {}, {}
    for sub, ids, seed in (
        ("train", tr_ids, cfg.seed),
        ("test", te_ids, cfg.seed + TEST_SEED_OFFSET),
    ):
        i, labs, names = 0, [], []
        for part in slides(len(ids), seed, f"synth_{sub}", cfg):
            for img in part.images:
                Image.fromarray(img).save(out / sub / f"{ids[i]}.tif")
                i += 1
            labs.append(part.labels)
            names += part.slides
        labels[sub], slide_of[sub] = np.concatenate(labs), np.array(names)
    pd.DataFrame({"id": tr_ids, "label": labels["train"]}).to_csv(
        out / "train_labels.csv", index=False
    )
    # Kaggle's sample submission lists test ids in an order unrelated to the files
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(te_ids))
    pd.DataFrame({"id": np.array(te_ids)[order], "label": 0}).to_csv(
        out / "sample_submission.csv", index=False
    )
    pd.DataFrame({"id": np.array(te_ids)[order], "label": labels["test"][order]}).to_csv(
        out / "test_labels.csv", index=False
    )
    # like the community slide map: covers most but not all train ids
    rng = np.random.default_rng([cfg.seed, 3])
    mapped = np.flatnonzero(rng.random(cfg.n) < cfg.slide_map_coverage)
    pd.DataFrame({"id": np.array(tr_ids)[mapped], "wsi": slide_of["train"][mapped]}).to_csv(
        out / "patch_id_wsi.csv", index=False
    )


def _write_pcam(out: Path, cfg: SynthConfig, train: Patches, test: Patches) -> None:
    import h5py

    out.mkdir(parents=True)
    # PCam's train and valid splits share no slide: split train slides ~85/15
    slides = np.array(train.slides)
    names = sorted(set(train.slides))
    rng = np.random.default_rng([cfg.seed, 4])
    valid_slides = set(rng.choice(names, size=max(1, len(names) * 15 // 100), replace=False))
    is_valid = np.isin(slides, list(valid_slides))
    parts = {
        "train": (train, ~is_valid),
        "valid": (train, is_valid),
        "test": (test, np.ones(len(test.labels), bool)),
    }
    for split, (p, mask) in parts.items():
        base = out / f"camelyonpatch_level_2_split_{split}"
        with h5py.File(f"{base}_x.h5", "w") as f:
            f.create_dataset(
                "x", data=p.images[mask], chunks=(min(32, int(mask.sum())), 96, 96, 3)
            )
        with h5py.File(f"{base}_y.h5", "w") as f:
            f.create_dataset("y", data=p.labels[mask].reshape(-1, 1, 1, 1).astype(np.uint8))
        pd.DataFrame(
            {
                "coord_y": p.coords[mask, 0],
                "coord_x": p.coords[mask, 1],
                "tumor_patch": p.tumour_any[mask],
                "center_tumor_patch": p.true_labels[mask] == 1,
                "wsi": np.array(p.slides)[mask],
            }
        ).to_csv(f"{base}_meta.csv", index=False)


def write(out: Path, cfg: SynthConfig = SynthConfig(), layout: str = "kaggle") -> Path:
    """Generate and write the dataset to ``out`` (must not exist yet), atomically."""
    out = Path(out)
    if layout not in ("kaggle", "pcam"):
        raise ValueError(f"layout must be 'kaggle' or 'pcam', got {layout!r}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if layout == "kaggle":
            _write_kaggle(tmp, cfg)  # streamed
        else:
            _write_pcam(tmp, cfg, *make(cfg))  # in memory: valid slides are drawn from all
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_embedded(root: Path, cfg: SynthConfig = SynthConfig()) -> Path:
    """The embedded dataset's Kaggle-layout folder under ``root``, generated on first use."""
    name = f"kaggle-n{cfg.n}-t{cfg.test_count}-s{cfg.seed}-v{GENERATOR_VERSION}"
    knobs = {k: v for k, v in asdict(cfg).items() if k not in ("n", "n_test", "seed")}
    if knobs != {k: v for k, v in asdict(SynthConfig()).items() if k in knobs}:
        # other difficulty settings: a folder of their own (the default keeps its old name)
        name += "-" + hashlib.sha1(repr(sorted(knobs.items())).encode()).hexdigest()[:8]
    out = Path(root) / name
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(out, cfg, "kaggle")
        except FileExistsError:
            if not out.is_dir():  # only a concurrent writer finishing first is fine
                raise
    return out
