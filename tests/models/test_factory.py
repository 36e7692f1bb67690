import os

import pytest
import torch

import models
from models.factory import STAGES

ARCHS = ["simple_cnn", "resnet18", "resnet34", "resnet50", "mobilenetv3_small_100"]


@pytest.mark.parametrize("arch", ARCHS)
def test_create_returns_one_finite_logit(arch):
    m = models.create(arch, dropout=0.2).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 1) and torch.isfinite(out).all()


@pytest.mark.parametrize("unfreeze", [0, 1, 2, 3, 4])
def test_create_resnet_unfreeze_sets_requires_grad_per_stage(unfreeze):
    m = models.create("resnet18", unfreeze=unfreeze)
    # stages counted from the head: unfreeze=n trains the last n stages; the stem only at 4
    for i, stage in enumerate(STAGES):
        trains = i < unfreeze
        assert all(p.requires_grad == trains for p in getattr(m, stage).parameters()), stage
    assert all(p.requires_grad == (unfreeze == 4) for p in m.conv1.parameters())
    assert all(p.requires_grad for p in m.fc.parameters())


def test_create_frozen_stage_keeps_batchnorm_statistics():
    m = models.create("resnet18", unfreeze=1).train()
    before = m.layer1.state_dict()["0.bn1.running_mean"].clone()
    m(torch.rand(4, 3, 64, 64) * 5)
    assert torch.equal(m.layer1.state_dict()["0.bn1.running_mean"], before)


def test_create_unknown_name_lists_close_matches():
    with pytest.raises(models.UnknownModelError, match="resnet50"):
        models.create("resnet5O")


def test_create_pretrained_true_without_cache_is_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(models.MissingWeightsError, match="not found locally.*--pretrained"):
        models.create("resnet18", pretrained=True)


def test_create_pretrained_missing_path_is_clear_error(tmp_path):
    with pytest.raises(models.MissingWeightsError, match="does not exist"):
        models.create("resnet18", pretrained=tmp_path / "nope.pth")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_create_pretrained_path_loads_backbone_weights(tmp_path, fmt):
    import timm

    src = timm.create_model("resnet18", num_classes=1000)  # ImageNet-shaped head
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    m = models.create("resnet18", pretrained=path)
    assert torch.equal(m.conv1.weight, src.conv1.weight)
    assert torch.equal(m.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert m.fc.out_features == 1  # head replaced, not loaded


class _Payload:
    def __reduce__(self):  # unpickling this would run a command: it must never be unpickled
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "content, says",
    [
        ({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, "holds objects other than"),
        ({"x": _Payload()}, "holds objects other than tensors"),
        (b"not a torch file at all", "is not a torch file"),
    ],
)
def test_create_pretrained_refuses_a_file_that_is_not_weights(
    tmp_path, monkeypatch, content, says
):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError) as e:
        models.create("resnet18", pretrained=path)
    assert str(e.value).startswith(f"{path}: not a weights file") and says in str(e.value)
    assert "weights_only" not in str(e.value)  # no advice to load it unsafely
    assert not (tmp_path / "pwned").exists()


def test_create_pretrained_wrong_architecture_is_error(tmp_path):
    import timm

    path = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(ValueError, match="do not fit"):
        models.create("resnet18", pretrained=path)


def test_data_config_from_timm_and_simple_cnn_constants():
    r = models.create("resnet18")
    assert models.data_config(r, "resnet18")["mean"] == pytest.approx((0.485, 0.456, 0.406))
    s = models.data_config(models.create("simple_cnn"), "simple_cnn")
    assert len(s["mean"]) == 3 and len(s["std"]) == 3


def test_create_simple_cnn_pretrained_file_is_loaded_not_ignored(tmp_path):
    # asked-for weights are never a silent random init, for the simple CNN too
    from safetensors.torch import save_file

    src = models.create("simple_cnn", width=8)
    path = tmp_path / "cnn.safetensors"
    save_file(src.state_dict(), str(path))
    m = models.create("simple_cnn", width=8, pretrained=path)
    want = src.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="do not fit"):
        models.create("simple_cnn", width=16, pretrained=path)  # other width: an error


def _fake_hub(tmp_path, monkeypatch):
    """Caches redirected to ``tmp_path`` and a download that writes timm-shaped resnet18
    weights there (what the real hub would leave); returns the list of downloads made."""
    import timm
    from safetensors.torch import save_file

    import models.factory as factory

    target = tmp_path / "hub" / "model.safetensors"
    monkeypatch.setattr(factory, "cached_weights", lambda arch: [target])
    made = []

    def download(arch):
        made.append(arch)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(timm.create_model(arch, num_classes=1000).state_dict(), str(target))
        return target

    return made, download


def test_fetch_weights_downloads_once_then_reads_the_cache(tmp_path, monkeypatch):
    made, download = _fake_hub(tmp_path, monkeypatch)
    path = models.fetch_weights("resnet18", download=download)
    assert models.fetch_weights("resnet18", download=download) == path
    assert made == ["resnet18"]  # the second call found the cached file
    # trials read the same cache with pretrained=True (they never download)
    m = models.create("resnet18", pretrained=True)
    assert m.fc.out_features == 1 and torch.isfinite(m.conv1.weight).all()


def test_fetch_weights_offline_names_the_arch_and_what_to_do(tmp_path, monkeypatch):
    _, _ = _fake_hub(tmp_path, monkeypatch)

    def offline(arch):
        raise OSError("[Errno 101] Network is unreachable")

    with pytest.raises(models.MissingWeightsError) as e:
        models.fetch_weights("resnet50", download=offline)
    msg = str(e.value)
    assert "'resnet50'" in msg and "Network is unreachable" in msg
    assert "timm.create_model('resnet50', pretrained=True)" in msg and "--pretrained PATH" in msg


def test_search_pretrained_hub_fetches_each_arch_once_on_the_driver(tmp_path, monkeypatch):
    from search.commands import search_config as cli
    from search.common.config import SearchConfig
    from search.tuning.space import load_space

    made, download = _fake_hub(tmp_path, monkeypatch)
    monkeypatch.setattr(
        models, "fetch_weights", lambda arch: models.factory.fetch_weights(arch, download)
    )
    space_file = tmp_path / "space.toml"
    space_file.write_text(
        '[fixed]\narch = "resnet18"\ncrop = 32\n\n'
        '[params.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-2\n'
    )
    cfg = SearchConfig(pretrained="hub")
    assert cfg.pretrained_arg is True  # trials read the caches
    cli.check_weights(cfg, load_space(str(space_file)))
    assert made == ["resnet18"]


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (None, False),
        ("", False),
        (False, False),
        ("cache", True),
        ("hub", True),
        ("w.pth", "w.pth"),
    ],
)
def test_weights_arg_hub_and_cache_read_the_caches(value, want):
    # what a refit passes to the engine for the study's --pretrained: "hub" was fetched by
    # the search's driver, so it reads the caches like "cache"
    from search.common.config import weights_arg

    assert weights_arg(value) == want
