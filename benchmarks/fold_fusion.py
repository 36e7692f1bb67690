"""Fold fusion: a trial's k fold models trained as one grouped-convolution model, against
training them one after another as the engine does, side by side.

    python benchmarks/fold_fusion.py [--k 3 --width 16 --crop 64 --batch 64 --steps 20]

The k fold models of a trial share architecture, params and schedule, so in lockstep they
can train as one model whose convolutions have ``groups=k`` (channels of fold f in block f):
BatchNorm is per channel and Adam(W) elementwise, so the fused model is exactly the k models
(checked here: one fused step equals k separate steps to float tolerance). Each fold still
gets its own batch (its own training rows): the k batches are stacked along channels.

Prints fold-images per second (k x batch x steps / s) for both, and the ratio. Fusion is
worth building for the CPU space if the ratio is >= 1.3 at k = 3 (simple_cnn, the CPU
space's crops and batch sizes); on a GPU it cuts kernel launches ~k x, which matters for
small CNNs that leave the GPU launch-bound (run this on the GPU to see by how much).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from models.simple_cnn import SimpleCNN


class FusedSimpleCNN(nn.Module):
    """k ``SimpleCNN``s as one: every conv has groups=k, every BatchNorm k x the channels,
    the head a grouped 1x1 conv. Input (B, 3k, H, W): fold f's batch in channels 3f..3f+2;
    output (B, k) logits, column f from fold f's model."""

    def __init__(self, k: int, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.k = k
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2**i
            layers += [
                nn.Conv2d(c_in * k, c_out * k, 3, padding=1, bias=False, groups=k),
                nn.BatchNorm2d(c_out * k),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out * k, c_out * k, 3, padding=1, bias=False, groups=k),
                nn.BatchNorm2d(c_out * k),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Conv2d(c_in * k, k, 1, groups=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(self.features(x), 1)  # (B, C*k, 1, 1)
        return self.fc(z).flatten(1)  # (B, k)

    @classmethod
    def from_models(cls, ms: list[SimpleCNN], width: int, depth: int) -> FusedSimpleCNN:
        """The fused model holding exactly the weights of ``ms``."""
        fused = cls(len(ms), width, depth)
        sds = [m.state_dict() for m in ms]
        own = fused.state_dict()
        for name in own:
            src = "fc" + name[2:] if name.startswith("fc") else name
            parts = [sd[src] for sd in sds]
            if name == "fc.weight":  # (1, C) per model -> (k, C, 1, 1)
                parts = [p.view(1, -1, 1, 1) for p in parts]
            if own[name].ndim == 0:  # num_batches_tracked
                own[name] = parts[0]
            else:
                own[name] = torch.cat(parts)
        fused.load_state_dict(own)
        return fused


def _batches(k: int, batch: int, crop: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(steps, k, batch, 3, crop, crop, generator=g)
    ys = (torch.rand(steps, k, batch, generator=g) < 0.4).float()
    return xs, ys


def separate_step(ms, opts, x, y) -> None:
    for f, (m, opt) in enumerate(zip(ms, opts, strict=True)):
        loss = F.binary_cross_entropy_with_logits(m(x[f]).squeeze(1), y[f])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fused_step(fm, opt, x, y) -> None:
    k = x.shape[0]
    xf = x.permute(1, 0, 2, 3, 4).reshape(x.shape[1], 3 * k, *x.shape[-2:])
    xf = xf.contiguous(memory_format=torch.channels_last)
    # sum over folds of each fold's mean loss: fold f's weights get fold f's gradient only
    loss = F.binary_cross_entropy_with_logits(fm(xf), y.t(), reduction="none").mean(0).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def check_exact(k: int, width: int, depth: int, crop: int) -> float:
    """Max |difference| of the logits after one step of each (fused vs separate)."""
    torch.manual_seed(0)
    ms = [SimpleCNN(width, depth) for _ in range(k)]
    fm = FusedSimpleCNN.from_models(ms, width, depth)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in ms]
    fopt = torch.optim.AdamW(fm.parameters(), lr=1e-3)
    xs, ys = _batches(k, 8, crop, 1)
    separate_step(ms, opts, xs[0], ys[0])
    fused_step(fm, fopt, xs[0], ys[0])
    for m in (*ms, fm):
        m.eval()
    x = xs[0]
    want = torch.stack([m(x[f]).squeeze(1) for f, m in enumerate(ms)], 1)
    got = fm(x.permute(1, 0, 2, 3, 4).reshape(8, 3 * k, crop, crop))
    return float((want - got).abs().max().detach())


def timed(step, steps: int, dev: torch.device) -> float:
    step(0)  # warm-up: first-call oneDNN/cuDNN setup
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for s in range(1, steps):
        step(s)
    sync()  # CUDA kernels run asynchronously: wait to time them
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--crops", type=int, nargs="*", default=[32, 48, 64])
    ap.add_argument("--batches", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    k, w, d = args.k, args.width, args.depth
    print(f"fused vs separate: one step's max logit difference {check_exact(k, w, d, 32):.2e}")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"k = {k}, simple_cnn width {w} depth {d}, {where}, threads {torch.get_num_threads()}")
    print("| crop | batch | separate fold-img/s | fused fold-img/s | fused / separate |")
    print("|---:|---:|---:|---:|---:|")
    for crop in args.crops:
        for batch in args.batches:
            a, b = measure(k, w, d, crop, batch, args.steps, args.repeats, dev)
            print(f"| {crop} | {batch} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |", flush=True)


def measure(
    k: int, w: int, d: int, crop: int, batch: int, steps: int, repeats: int, dev: torch.device
) -> tuple[float, float]:
    """(separate, fused) fold-images per second: medians of interleaved repeats."""
    xs, ys = _batches(k, batch, crop, steps)
    xs, ys = xs.to(dev), ys.to(dev)
    # separate models take channels_last batches, as the engine gives them
    xcl = [
        [xs[s, f].contiguous(memory_format=torch.channels_last) for f in range(k)]
        for s in range(steps)
    ]
    sep, fus = [], []
    for _ in range(repeats):  # interleaved: the machine's drift hits both
        torch.manual_seed(0)
        ms = [SimpleCNN(w, d).to(dev, memory_format=torch.channels_last) for _ in range(k)]
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in ms]
        fm = FusedSimpleCNN.from_models(ms, w, d).to(dev, memory_format=torch.channels_last)
        fopt = torch.optim.AdamW(fm.parameters(), lr=1e-3)

        def one(s: int, ms=ms, opts=opts) -> None:
            separate_step(ms, opts, xcl[s], ys[s])

        def fused(s: int, fm=fm, fopt=fopt) -> None:
            fused_step(fm, fopt, xs[s], ys[s])

        sep.append(timed(one, steps, dev))
        fus.append(timed(fused, steps, dev))
    n = k * batch * (steps - 1)
    return n / sorted(sep)[len(sep) // 2], n / sorted(fus)[len(fus) // 2]


if __name__ == "__main__":
    main()
