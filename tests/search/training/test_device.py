"""The GPU path, checked on any machine: precision, the memory plan, the device pool and its
fallback, host syncs per step, the fold's own random stream, prefetch, device settings."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import models
import search.training.device as device
import search.training.engine as engine
import search.training.fold as training_fold
from search.training import batches, results
from search.training.engine import TrainData, TrainParams, train_cv

TINY = {"crop": 32, "batch_size": 16, "lr": 3e-3, "width": 8}
GIB = 1 << 30


@pytest.fixture(scope="module")
def small(cv_data):
    """240 cached patches in 3 slide folds (memory-mapped, as trials see them)."""
    data, folds = cv_data(240, 3, seed=1, n_test=8)
    return data, folds


@pytest.fixture
def fresh_amp(monkeypatch):
    """``amp_dtype`` recomputed for the test, and again after it (it is cached per device)."""
    device.amp_dtype.cache_clear()
    yield monkeypatch
    device.amp_dtype.cache_clear()


# ---- precision ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amx", "env", "want"),
    [(True, None, "bf16"), (False, None, "fp32"), (True, "off", "fp32"), (True, "auto", "bf16")],
)
def test_precision_cpu_bf16_only_with_amx_units_unless_turned_off(fresh_amp, amx, env, want):
    # CPU bf16 autocast is faster only where the CPU has bf16 matrix units (AMX); elsewhere it
    # is emulated and slower, and PCAM_AMP=off keeps every device in fp32
    fresh_amp.setattr(device, "cpu_bf16", lambda: amx)
    if env is None:
        fresh_amp.delenv(device.AMP_ENV, raising=False)
    else:
        fresh_amp.setenv(device.AMP_ENV, env)
    assert device.precision("cpu") == want


@pytest.mark.parametrize(
    ("native", "env", "want"),
    [(True, None, torch.bfloat16), (False, None, torch.float16), (False, "off", None)],
)
def test_choose_amp_cuda_bf16_only_where_native_else_fp16(native, env, want):
    assert device.choose_amp("cuda", native, env) == want


@pytest.mark.parametrize(
    ("gpu", "emulated_only", "want"), [("T4", True, "fp16"), ("H100", False, "bf16")]
)
def test_precision_cuda_asks_for_native_bf16_not_emulated(fresh_amp, gpu, emulated_only, want):
    # a T4/V100/P100 answers yes to is_bf16_supported() by default (emulated bf16, slow);
    # asked without emulation it says no, and the trial trains in fp16 with loss scaling
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation if emulated_only else True

    fresh_amp.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    fresh_amp.delenv(device.AMP_ENV, raising=False)
    assert device.precision(torch.device("cuda")) == want, gpu
    assert asked == [False]


# ---- the memory plan ------------------------------------------------------------------------


def test_plan_pool_device_only_when_pool_and_trial_fit_the_share():
    # the case: 220,025 patches at crop 96 are a 6.1 GB pool
    pool = device.pool_bytes(220_025, 96)
    assert pool == pytest.approx(6.08e9, rel=0.01)
    trial = 3 * GIB
    # an H200 (141 GB) shared by 4 trials: 35 GB each, room for both
    assert device.plan_pool(int(141e9 * 0.25), pool, trial).where == "device"
    # a 16 GB T4 shared by 4: 4 GB each, no room, decided before any copy
    plan = device.plan_pool(int(16e9 * 0.25), pool, trial)
    assert plan.where == "host" and "exceed" in plan.reason
    # headroom: a plan that fits only without it goes to the host
    assert device.plan_pool(pool + trial, pool, trial).where == "host"
    assert device.plan_pool(pool + trial, pool, trial, headroom=0.0).where == "device"


def test_activation_bytes_on_meta_equal_a_real_forward():
    # the plan builds models on the meta device (no memory, no compute): its count of the
    # tensors autograd saves must be the count a real forward gives
    torch.manual_seed(0)
    real = models.create("simple_cnn", width=8, depth=3).to(memory_format=torch.channels_last)
    with torch.device("meta"):
        meta = models.create("simple_cnn", width=8, depth=3)
    got = device.activation_bytes(meta, 16, 32)
    assert got == device.activation_bytes(real, 16, 32) > 0
    assert device.state_bytes(meta, "adamw", False) == device.state_bytes(real, "adamw", False)


@pytest.mark.parametrize(
    ("arch", "crop", "low", "high"), [("resnet50", 96, 3, 16), ("simple_cnn", 64, 0.8, 4)]
)
def test_estimate_trial_bytes_resnet50_and_simple_cnn_at_batch_256(arch, crop, low, high):
    with torch.device("meta"):
        m = models.create(arch).to(memory_format=torch.channels_last)
    est = device.estimate_trial_bytes(m, "adamw", False, 3, 256, crop)
    # resnet50: 23.5 M params x (weights, grads, 2 Adam moments) x 3 folds = 1.1 GB, plus
    # ~6 GB of fp32 saved activations at 256 x 96 x 96 (doubled for their gradients)
    assert low * GIB < est < high * GIB
    # activations scale with the batch; the k models' states with k
    half = device.estimate_trial_bytes(m, "adamw", False, 3, 128, crop)
    one = device.estimate_trial_bytes(m, "adamw", False, 1, 256, crop)
    assert half < est and one < est
    if arch == "resnet50":
        params = sum(p.numel() for p in m.parameters())
        assert 23e6 < params < 24e6
        assert device.state_bytes(m, "adamw", False) == pytest.approx(16 * params, rel=0.01)


def test_plan_pool_for_cpu_is_host():
    p = TrainParams.from_dict(TINY)
    assert engine.plan_pool_for(p, 1000, 3, torch.device("cpu"), 1.0).where == "host"


# ---- the device pool --------------------------------------------------------------------------


def test_train_cv_device_pool_and_host_path_train_the_same(small):
    # where the pool lives changes no number: the same order, draws and batches
    data, folds = small
    params = {**TINY, "mix": "mixup", "mix_prob": 0.5, "pos_weight": 1.3}
    host = train_cv(params, data, folds, epochs=2, device="cpu", threads=2, pool="host")
    dev = train_cv(params, data, folds, epochs=2, device="cpu", threads=2, pool="device")
    assert (host.pool, dev.pool) == ("host", "device")
    assert [h["auc_folds"] for h in host.history] == [h["auc_folds"] for h in dev.history]
    assert host.final["train_loss"] == dev.final["train_loss"]


def test_device_pool_is_one_allocation_no_list_and_cat(small, monkeypatch):
    # a list of chunks + torch.cat briefly needs twice the pool: the pool is filled in place
    data, _ = small
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("torch.cat builds the pool"))
    b = batches.Batcher(
        data.images, data.labels, 32, torch.device("cpu"), (0.5,) * 3, (0.2,) * 3, "device"
    )
    want = batches.crop_batch(np.asarray(data.images), 32)
    assert b.place == "device" and torch.equal(b.x, want)


def test_device_pool_out_of_memory_while_copying_falls_back_to_host(small, monkeypatch):
    data, folds = small
    real_empty = torch.empty

    def empty(*a, **k):
        if k.get("dtype") is torch.uint8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.08 GiB")
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", empty)
    r = train_cv(TINY, data, folds, epochs=1, device="cpu", threads=2, pool="device")
    assert r.pool == "host" and "did not fit" in r.pool_note and "6.08 GiB" in r.pool_note
    assert np.isfinite(r.final["auc"])


def test_device_pool_out_of_memory_in_first_step_restarts_on_host_not_a_fail(small, monkeypatch):
    # an OOM with the pool on the device, before anything was reported, is the plan's miss,
    # not the params': the trial restarts on the host path (same seeds: same result)
    data, folds = small
    want = train_cv(TINY, data, folds, epochs=1, device="cpu", threads=2, pool="host")
    real = training_fold.Fold.train_epoch

    def train_epoch(self, run):
        if run.batch.place == "device":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512 MiB")
        return real(self, run)

    monkeypatch.setattr(training_fold.Fold, "train_epoch", train_epoch)
    r = train_cv(TINY, data, folds, epochs=1, device="cpu", threads=2, pool="device")
    assert r.pool == "host" and "before the first report" in r.pool_note
    assert r.final["auc_folds"] == want.final["auc_folds"]


def test_out_of_memory_after_a_report_is_the_trials(small, monkeypatch):
    data, folds = small
    monkeypatch.setattr(
        training_fold.Fold,
        "train_epoch",
        lambda self, run: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory")),
    )
    with pytest.raises(results.TrialOutOfMemory):
        train_cv(TINY, data, folds, epochs=1, device="cpu", threads=2, pool="host")


# ---- no host sync inside a training step ----------------------------------------------------

# Device -> host reads (each waits for the GPU) and host -> device copies that block
_READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"}


class _SyncCounter(TorchFunctionMode):
    """Counts, in the project's own code (not torch's internals), calls that make the host
    wait on a CUDA device: reads of a tensor's value, blocking copies (``.to``/``.copy_``
    with a device and without ``non_blocking``), and tensors built from Python data on a
    device (``torch.tensor(..., device=)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if self._ours() and self._syncs(name, args, kwargs):
            self.calls.append(name)
        return func(*args, **kwargs)

    @staticmethod
    def _ours() -> bool:
        # the direct caller (past torch's dispatch helpers): our code, or torch's own
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename.endswith(("overrides.py", "_tensor.py")):
            f = f.f_back
        name = f.f_code.co_filename if f is not None else ""
        return "/search/" in name and "/tests/" not in name

    @staticmethod
    def _syncs(name: str, args, kwargs) -> bool:
        if name in _READS:
            return True
        if name in ("to", "copy_", "cuda"):
            has_device = (
                name == "cuda"
                or "device" in kwargs
                or any(isinstance(a, (str, torch.device)) for a in args[1:])
            )
            return has_device and not kwargs.get("non_blocking", False)
        return name in ("tensor", "as_tensor") and "device" in kwargs


@pytest.mark.parametrize("pool", ["device", "host"])
def test_train_epoch_makes_no_host_sync_per_step(small, pool):
    # augmentation, MixUp and pos_weight on: every per-step draw and constant lives on the
    # device or was drawn on the host once per epoch
    data, folds = small
    counts = {}
    for n_rows in (64, 128):  # 4 and 8 steps
        rows = np.flatnonzero(folds != 0)[:n_rows]
        sub = TrainData(data.images[rows], data.labels[rows])
        p = TrainParams.from_dict(
            {**TINY, "aug": 0.5, "mix": "mixup", "mix_prob": 1.0, "pos_weight": 1.5}
        )
        every = np.ones(len(rows), np.int64)
        fold = training_fold.Fold(0, p, every, 1, 0, torch.device("cpu"), False)
        norm = models.data_config(fold.model, p.arch)
        b = batches.Batcher(
            sub.images, sub.labels, 32, torch.device("cpu"), norm["mean"], norm["std"], pool
        )
        run = training_fold.Run(p, torch.device("cpu"), b, sub.labels)
        with _SyncCounter() as c:
            fold.train_epoch(run)
        counts[fold.steps] = c.calls
    (s1, few), (s2, more) = sorted(counts.items())
    assert s2 == 2 * s1
    # the same calls whatever the number of steps: none of them is per step
    assert few == more, (few, more)
    assert len(few) <= 5  # per epoch: the order (host path), mix draws, the epoch's loss


def test_sync_counter_sees_the_old_per_step_pattern():
    # the counter is not blind: a step written the old way (index tensor copied, masks drawn
    # on the host and copied, pos_weight built per step) is counted every time
    with _SyncCounter() as c:
        exec(
            compile(
                "import torch\n"
                "x = torch.rand(4, 3)\n"
                "for _ in range(3):\n"
                "    m = torch.rand(4, device='cpu').to(x.device) < 0.5\n"
                "    w = torch.tensor(1.5, device=x.device)\n"
                "    float(x.sum())\n",
                "/fake/search/step.py",
                "exec",
            ),
            {},
        )
    assert len(c.calls) == 9


# ---- the fold's own random stream -----------------------------------------------------------


def test_fold_alone_equals_fold_in_lockstep_bit_for_bit(small):
    # racing trains fold 0 alone for its first epochs; lockstep interleaves it with the
    # others. Dropout, augmentation, MixUp (its lam too) all draw from the fold's stream,
    # so fold 0 ends with the same weights either way
    data, folds = small
    params = {**TINY, "dropout": 0.3, "aug": 0.5, "mix": "mixup", "mix_prob": 0.7}
    kw = dict(epochs=2, device="cpu", threads=2, keep_states=True)
    alone = train_cv(params, data, folds, race_epochs=2, **kw)
    lock = train_cv(params, data, folds, **kw)
    assert alone.history[1]["folds"] == 1  # epoch 2 of fold 0, before any other fold trained
    assert alone.history[1]["auc_folds"][0] == lock.history[1]["auc_folds"][0]
    for name, v in alone.states[0].items():
        assert torch.equal(v, lock.states[0][name]), name


def test_fold_training_leaves_the_global_stream_alone(small):
    data, folds = small
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    train_cv({**TINY, "mix": "cutmix", "mix_prob": 1.0}, data, folds, epochs=1, device="cpu")
    assert torch.equal(torch.rand(3), want)


# ---- prefetch ---------------------------------------------------------------------------------


def test_prefetched_computes_one_ahead_in_order():
    import threading

    log, ready = [], threading.Event()

    def fn(i):
        log.append(("made", i))
        if i == 1:
            ready.set()
        return i * 10

    got = []
    for v in batches._prefetched(fn, [0, 1, 2]):
        if v == 0:  # while the caller holds batch 0, batch 1 is being made
            assert ready.wait(5)
        got.append(v)
        log.append(("used", v))
    assert got == [0, 10, 20]
    assert log.index(("made", 1)) < log.index(("used", 0))


def test_host_path_with_prefetch_gives_the_same_batches(small):
    data, folds = small
    rows = np.flatnonzero(folds != 0)
    out = []
    for prefetch in (False, True):
        b = batches.Batcher(
            data.images,
            data.labels,
            32,
            torch.device("cpu"),
            (0.5,) * 3,
            (0.2,) * 3,
            "host",
            prefetch,
        )
        torch.manual_seed(5)
        out.append(list(b.epoch(rows, None, 4, 16)))
    for (x0, y0), (x1, y1) in zip(*out, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ---- device settings ------------------------------------------------------------------------


def test_configure_turns_on_cudnn_autotuning_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    threads = torch.get_num_threads()
    device.configure(torch.device("cuda"), 1)
    assert torch.backends.cudnn.benchmark is True and torch.get_num_threads() == threads


def test_train_cv_releases_the_device_after_each_trial_even_on_error(small, monkeypatch):
    data, folds = small
    released = []
    monkeypatch.setattr(engine, "release", lambda dev: released.append(dev.type))
    train_cv(TINY, data, folds, epochs=1, device="cpu", threads=2)
    assert released == ["cpu"]
    with pytest.raises(results.TrialDiverged):
        train_cv({**TINY, "lr": 1e30, "optimizer": "sgd"}, data, folds, epochs=1, device="cpu")
    assert released == ["cpu", "cpu"]


def test_release_empties_the_cuda_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    device.release(torch.device("cpu"))
    device.release(torch.device("cuda"))
    assert emptied == [1]


# ---- GPU twins (run where CUDA is: pytest -m gpu) -------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("pool", ["device", "host"])
def test_train_cv_on_cuda_trains_with_either_pool(small, pool):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    data, folds = small
    params = {**TINY, "aug": 0.5, "mix": "cutmix", "mix_prob": 0.5, "pos_weight": 1.3}
    r = train_cv(params, data, folds, epochs=2, device="cuda", pool=pool, keep_states=True)
    assert r.pool == pool and r.device == torch.cuda.get_device_name()
    assert np.isfinite(r.final["auc"]) and np.isfinite(r.final["train_loss"])
    # the saved states are CPU fp32, whatever the autocast dtype
    assert all(v.device.type == "cpu" for v in r.states[0].values())


@pytest.mark.gpu
def test_cuda_precision_matches_the_hardware():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device.amp_dtype.cache_clear()
    major, _ = torch.cuda.get_device_capability()
    want = "bf16" if major >= 8 else "fp16"
    assert device.precision("cuda") == want
