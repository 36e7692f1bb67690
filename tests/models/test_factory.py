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


def test_create_pretrained_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        models.create("resnet18", pretrained=path)


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
