"""Where and in which arithmetic a trial trains: precision, the GPU memory plan, device setup.

- Precision (``amp_dtype``/``precision``): bf16 autocast only where the hardware runs it
  natively (CUDA compute capability >= 8.0: A100, L4, H100/H200; CPUs with AMX units); fp16
  autocast with loss scaling on older GPUs (T4, V100, P100), where
  ``torch.cuda.is_bf16_supported()`` would also say yes, for an *emulated*, slow bf16;
  fp32 elsewhere or with ``PCAM_AMP=off``.
- The memory plan (``plan_pool``): whether a trial's cropped patch pool fits on its share of
  the GPU beside its k fold models, their optimizer states and one batch's activations
  (``estimate_trial_bytes``), decided before any copy. Fractional trials (``--gpus-per-trial
  0.25``) plan with their share, not with the free memory every trial sees at once.
"""

from __future__ import annotations

import functools
import gc
import os
from dataclasses import dataclass

import torch

# PCAM_AMP=off trains and predicts in fp32 everywhere
AMP_ENV = "PCAM_AMP"
AMP_OFF = ("off", "0", "fp32", "no")


def cpu_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX, Sapphire Rapids and later), where
    oneDNN runs bf16 convolutions 1.6-2x faster than fp32 (benchmarks/train_throughput.py);
    without them bf16 is emulated and slower, so those CPUs stay in fp32."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: may move
    return bool(is_amx and is_amx())


def cuda_native_bf16(dev: torch.device) -> bool:
    """Whether the GPU runs bf16 natively (compute capability >= 8.0). Not
    ``torch.cuda.is_bf16_supported()``'s default, which also counts emulated bf16. Asks the
    current device (a Ray trial sees only its own GPU)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_amp(kind: str, native_bf16: bool, env: str | None) -> torch.dtype | None:
    """The autocast dtype for a device of type ``kind`` ("cuda", "cpu", ...): bf16 where
    ``native_bf16``, fp16 on a CUDA device without it, else None (fp32); ``env`` (the value
    of ``PCAM_AMP``) "off" turns autocast off everywhere."""
    if (env or "auto").lower() in AMP_OFF or kind not in ("cuda", "cpu"):
        return None
    if native_bf16:
        return torch.bfloat16
    return torch.float16 if kind == "cuda" else None


@functools.cache  # asked per inference batch (probabilities): the answer is per device
def amp_dtype(dev: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``dev`` (``choose_amp`` with what this machine has; ``PCAM_AMP`` is
    read once per process)."""
    native = cuda_native_bf16(dev) if dev.type == "cuda" else dev.type == "cpu" and cpu_bf16()
    return choose_amp(dev.type, native, os.environ.get(AMP_ENV))


def precision(dev: str | torch.device) -> str:
    """The arithmetic training and inference use on ``dev``: "bf16", "fp16" or "fp32"."""
    amp = amp_dtype(torch.device(dev))
    names: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(amp, "fp32")


def configure(dev: torch.device, threads: int | None) -> None:
    """Per-process settings for training on ``dev``: CPU threads, or cuDNN's autotuner on
    CUDA (every batch of a trial has the same shape, so the fastest kernels are found once)."""
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif threads:
        torch.set_num_threads(threads)


def release(dev: torch.device) -> None:
    """Give a finished trial's cached GPU blocks back: Ray reuses the worker process for the
    next trial, and blocks kept in this process's cache are not free to other trials."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ---- the memory plan -----------------------------------------------------------------------

# Bytes per trainable parameter held by the optimizer: Adam(W) keeps two moments, SGD a
# momentum buffer, RMSprop its square average and (momentum > 0) a momentum buffer
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1, "rmsprop": 2}
# Per trial, outside the tensors counted: the CUDA context, cuDNN workspaces, allocator slack
FIXED_BYTES = 768 << 20
# The plan keeps this share of the trial's memory free (fragmentation, estimate error)
HEADROOM = 0.15


def pool_bytes(n: int, crop: int) -> int:
    """Bytes of ``n`` cropped uint8 RGB patches on the device."""
    return n * crop * crop * 3


def activation_bytes(model: torch.nn.Module, batch: int, crop: int) -> int:
    """Bytes autograd saves for the backward pass of one (batch, 3, crop, crop) fp32 forward,
    counted with saved-tensor hooks. ``model`` may live on the ``meta`` device (no memory, no
    compute): its tensors have shapes and dtypes, which is all the count needs. Views of one
    tensor saved twice are counted twice, so this errs high; under bf16/fp16 autocast the
    saved convolution inputs are half this."""
    dev = next(model.parameters()).device
    x = torch.empty(batch, 3, crop, crop, device=dev).contiguous(memory_format=torch.channels_last)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    was = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        model.train(was)
    return total


def state_bytes(model: torch.nn.Module, optimizer: str, ema: bool) -> int:
    """Bytes of one fold's tensors that live for the whole trial: weights and buffers, the
    trainable weights' gradients and optimizer states, and an EMA copy when on (fp32)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights * (2 if ema else 1) + trainable * (1 + OPTIMIZER_STATES.get(optimizer, 2))


def estimate_trial_bytes(
    model: torch.nn.Module, optimizer: str, ema: bool, k: int, batch: int, crop: int
) -> int:
    """Peak device bytes of a trial besides its pool: k folds' ``state_bytes`` (all k models
    stay on the device), the activations of one training batch (folds train one at a time;
    the gradients of activations roughly double the saved ones at their peak) and
    ``FIXED_BYTES``. ``model``: one fold's model, best on the ``meta`` device."""
    acts = activation_bytes(model, batch, crop)
    return k * state_bytes(model, optimizer, ema) + 2 * acts + FIXED_BYTES


@dataclass(frozen=True)
class PoolPlan:
    """Where a trial's patch pool lives: "device" (copied once, batches gathered there) or
    "host" (each batch gathered from the memory-mapped cache, pinned, copied ahead)."""

    where: str
    reason: str


def plan_pool(share_bytes: int, pool: int, trial: int, headroom: float = HEADROOM) -> PoolPlan:
    """Decide before any copy: the pool goes to the device only if pool + trial fit in the
    trial's share (``gpus_per_trial`` x the GPU's memory) less ``headroom``."""
    budget = int(share_bytes * (1 - headroom))
    gib = 1 << 30
    need = f"pool {pool / gib:.2f} GiB + trial {trial / gib:.2f} GiB"
    if pool + trial <= budget:
        return PoolPlan("device", f"{need} fit the trial's {budget / gib:.2f} GiB")
    return PoolPlan("host", f"{need} exceed the trial's {budget / gib:.2f} GiB")


def share_bytes(dev: torch.device, gpu_share: float) -> int:
    """A trial's memory on ``dev``: its share (``gpus_per_trial``, at most 1) of the GPU."""
    total = torch.cuda.get_device_properties(dev).total_memory
    return int(total * min(1.0, max(gpu_share, 0.0)))
