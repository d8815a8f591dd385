"""Pretrained weights: backbone loading by name (file, fsspec URI, torchvision ImageNet) and the
torchvision deeplabv3 converter."""

import logging
import urllib.error
from pathlib import Path

import fsspec
import pytest
import torch
import torchvision
from torch import nn

from deeplab_core.models import build_model
from deeplab_core.weights import from_torchvision, load_matching

WARNING_PREFIX = "pretrained weights from"


def _perturb_batchnorm(model: nn.Module) -> None:
    """Random BN statistics and affine terms, so eval-mode BN is not the identity-like default."""
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.0)
            nn.init.uniform_(bn.bias, -0.1, 0.1)


def _torchvision_deeplabv3(depth: int) -> nn.Module:
    torch.manual_seed(depth)
    model = getattr(torchvision.models.segmentation, f"deeplabv3_resnet{depth}")(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    _perturb_batchnorm(model)
    return model


def _assert_same_logits(reference: nn.Module, ours: nn.Module, size: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        expected = reference.eval()(x)["out"]
        actual = ours.eval()(x)
    assert actual.shape == expected.shape == (1, 21, *size)
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_from_torchvision_resnet101_same_logits_at_513():
    reference = _torchvision_deeplabv3(101)
    ours = from_torchvision(reference.state_dict(), backbone="resnet101", num_classes=21)
    assert sum(p.numel() for p in ours.parameters()) == 60_996_202
    assert ours.config["output_stride"] == 8 and ours.config["multi_grid"] is None
    assert ours.config["aspp_rates"] == [12, 24, 36]
    torch.manual_seed(0)
    _assert_same_logits(reference, ours, (513, 513))


def test_from_torchvision_resnet50_same_logits_and_aux_in_training():
    reference = _torchvision_deeplabv3(50)
    ours = from_torchvision(reference.state_dict(), backbone="resnet50")
    torch.manual_seed(0)
    _assert_same_logits(reference, ours, (129, 161))
    # Training mode (batch statistics, dropout): the same seed gives the same masks in both.
    x = torch.rand(2, 3, 97, 129)
    torch.manual_seed(1)
    expected = reference.train()(x)
    torch.manual_seed(1)
    actual = ours.train()(x)
    assert set(actual) == {"out", "aux"}
    for key in ("out", "aux"):
        assert (actual[key] - expected[key]).abs().max().item() < 1e-4


def test_from_torchvision_without_aux_and_from_a_file(tmp_path: Path):
    with torch.device("meta"):
        reference = torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=5, aux_loss=False
        )
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "tv.pth")
    ours = from_torchvision(str(tmp_path / "tv.pth"), backbone="resnet50", num_classes=5)
    assert ours.aux_classifier is None and ours.config["aux"] is False


def test_from_torchvision_rejects_a_different_checkpoint():
    with torch.device("meta"):
        state = torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=21, aux_loss=False
        ).state_dict()
    with pytest.raises(ValueError, match="not a torchvision deeplabv3_resnet101"):
        from_torchvision(state, backbone="resnet101")
    with pytest.raises(ValueError, match="with 10 classes"):
        from_torchvision(state, backbone="resnet50", num_classes=10)


@pytest.fixture
def resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 checkpoint (random weights, same names and shapes as ImageNet's)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def _assert_backbone_equals(model: nn.Module, state: dict[str, torch.Tensor], skip: str = "fc.") -> None:
    ours = model.backbone.state_dict()
    for name, tensor in state.items():
        if not name.startswith(skip):
            assert torch.equal(ours[name], tensor), name


def test_pretrained_from_local_file_reports_unexpected_keys(tmp_path, resnet18_state, caplog):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    with caplog.at_level(logging.WARNING, logger="deeplab_core.weights"):
        model = build_model("deeplabv3plus", "resnet18", num_classes=3, pretrained=str(path))
    _assert_backbone_equals(model, resnet18_state)
    [record] = [r for r in caplog.records if WARNING_PREFIX in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "unexpected (2): ['fc.weight', 'fc.bias']" in record.getMessage()
    assert "missing (0)" in record.getMessage()
    assert "pretrained" not in model.config


def test_pretrained_from_memory_uri_reports_missing_keys(resnet18_state, caplog):
    partial = {k: v for k, v in resnet18_state.items() if not k.startswith(("layer4.", "fc."))}
    with fsspec.open("memory://weights/resnet18-partial.pth", "wb") as f:
        torch.save(partial, f)
    with caplog.at_level(logging.WARNING, logger="deeplab_core.weights"):
        model = build_model(
            "deeplabv3", "resnet18", num_classes=3, pretrained="memory://weights/resnet18-partial.pth"
        )
    _assert_backbone_equals(model, partial)
    message = next(r.getMessage() for r in caplog.records if WARNING_PREFIX in r.getMessage())
    layer4 = [k for k in model.backbone.state_dict() if k.startswith("layer4.")]
    assert f"missing ({len(layer4)}): {layer4}" in message
    assert "unexpected (0)" in message


def test_pretrained_backbone_from_a_whole_model_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = build_model("deeplabv3plus", "resnet18", num_classes=5)
    torch.save({"model": source.state_dict(), "meta": {"note": "training checkpoint"}}, tmp_path / "model.pt")
    model = build_model("deeplabv3", "resnet18", num_classes=2, pretrained=str(tmp_path / "model.pt"))
    for name, tensor in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor)


def test_pretrained_with_nothing_matching_raises(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor from .*other.pth matches"):
        build_model("deeplabv3", "resnet18", pretrained=str(tmp_path / "other.pth"))


def test_shape_mismatches_are_reported_and_skipped(caplog):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    state = {"0.weight": torch.ones(4, 3, 3, 3), "0.bias": torch.ones(4), "1.weight": torch.ones(5, 4, 1, 1)}
    with caplog.at_level(logging.WARNING, logger="deeplab_core.weights"):
        report = load_matching(module, state, "test")
    assert report.loaded == ["0.weight", "0.bias"] and report.mismatched == ["1.weight"]
    assert report.missing == ["1.bias"] and report.unexpected == []
    assert torch.equal(module[0].weight, torch.ones(4, 3, 3, 3))
    assert "shape mismatch (1): ['1.weight']" in caplog.text


def test_imagenet_weights_from_torchvision_cache(tmp_path, monkeypatch, resnet18_state):
    """torchvision's weights API, served from its hub cache (as after an earlier download)."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state, cache / weights.url.rsplit("/", 1)[-1])
    model = build_model("deeplabv3plus", "resnet18", num_classes=3, pretrained="imagenet")
    _assert_backbone_equals(model, resnet18_state)


def test_imagenet_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"cannot download torchvision's ResNet18_Weights.IMAGENET1K_V1 .*pretrained="):
        build_model("deeplabv3plus", "resnet18", pretrained="imagenet")


def test_imagenet_weights_for_a_backbone_torchvision_lacks():
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("deeplabv3plus", "xception65", pretrained="imagenet")
