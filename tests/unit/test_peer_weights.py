"""Peers' checkpoints (VainF/DeepLabV3Plus-Pytorch, kazuto1011/deeplab-pytorch) convert into our
models with the same eval-mode logits.

Each peer network is re-implemented here, independently of deeplab_core, from its description
(docs/models.md, the design reference's section 9), with the peer's parameter names, so its state_dict is the
peer's file layout; the converted model must reproduce its logits to a relative 1e-5.
"""

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from deeplab_core.models import build_model
from deeplab_core.weights import (
    KAZUTO_MEAN_BGR,
    from_kazuto,
    from_torchvision,
    from_vainf,
)

TOLERANCE = 1e-5
SIZE = (65, 65)
# ResNets at 33x33: the feature maps (5x5 / 3x3 at OS 8 / 16) are already smaller than every ASPP
# rate at 65x65 too, and dilated convolutions are slow on CPU.
RESNET_SIZE = (33, 33)


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def perturb_batchnorm(module: nn.Module) -> None:
    """Random BN statistics and affine terms, so eval-mode BN is far from the identity."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.0)
            nn.init.uniform_(bn.bias, -0.1, 0.1)


def vainf_checkpoint(model: nn.Module) -> dict:
    """VainF's main.py `save_ckpt` layout."""
    return {"cur_itrs": 30000, "model_state": model.state_dict(), "optimizer_state": {}, "scheduler_state": {},
            "best_score": 0.77}


# --------------------------------------------------------------------------- VainF reference


class VainFV3Head(nn.Module):
    """VainF `DeepLabHead`: torchvision's head held as `classifier.classifier`."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.classifier = DeepLabHead(in_channels, num_classes, rates)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])


class VainFSeparable(nn.Module):
    """VainF `AtrousSeparableConvolution` replacing a 3x3 conv: `body` = depthwise 3x3 (same
    padding and dilation) -> pointwise 1x1, nothing in between; the conv's BN + ReLU follow."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        c_in = conv.in_channels
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, padding=conv.padding, dilation=conv.dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, conv.out_channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class VainFV3PlusHead(nn.Module):
    """VainF `DeepLabHeadV3Plus`: 1x1 48-ch projection of the low-level tap, concat [low, ASPP],
    one 3x3 256 conv + BN + ReLU, 1x1 classifier. `separable`: its `--separable_conv`, every 3x3
    conv of the head (three ASPP branches, the decoder conv) made a `VainFSeparable`."""

    def __init__(
        self, in_channels: int, low_channels: int, num_classes: int, rates: tuple[int, ...], separable: bool = False
    ) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.aspp = ASPP(in_channels, rates)
        self.classifier = nn.Sequential(
            nn.Conv2d(304, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(), nn.Conv2d(256, num_classes, 1)
        )
        if separable:
            for branch in self.aspp.convs[1:4]:
                branch[0] = VainFSeparable(branch[0])
            self.classifier[0] = VainFSeparable(self.classifier[0])

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        low = self.project(features["low_level"])
        out = F.interpolate(self.aspp(features["out"]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, out], dim=1))


def conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Module:
    """VainF `ConvBNReLU`: no padding inside the conv."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, 0, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class FixedPaddingInvertedResidual(nn.Module):
    """VainF's inverted residual: F.pad the block's input by the 3x3 conv's half extent, then
    1x1 expansion, unpadded depthwise 3x3, linear 1x1."""

    def __init__(self, c_in: int, c_out: int, stride: int, dilation: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn_relu6(c_in, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, dilation, hidden), nn.Conv2d(hidden, c_out, 1, bias=False),
                   nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.pad = dilation  # (3 + 2 (dilation - 1) - 1) / 2 on each side
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(F.pad(x, (self.pad,) * 4))
        return x + out if self.residual else out


MOBILENET_V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class VainFMobileNetV2(nn.Module):
    """VainF's MobileNetV2 classifier network: `features` = stem (unpadded 3x3 stride 2), 17
    inverted residuals, a 1x1 conv to 1280 channels; then `classifier`. Once the output stride is
    reached a stage runs at stride 1 and multiplies the rate; its first block keeps the previous rate."""

    def __init__(self, output_stride: int, num_classes: int = 1000) -> None:
        super().__init__()
        features: list[nn.Module] = [conv_bn_relu6(3, 32, 3, stride=2)]
        current_stride, rate, c_in = 2, 1, 32
        for expand, c_out, repeats, stride in MOBILENET_V2:
            previous_rate = rate
            if current_stride == output_stride:
                rate, stride = rate * stride, 1
            else:
                current_stride *= stride
            for i in range(repeats):
                features.append(FixedPaddingInvertedResidual(
                    c_in, c_out, stride if i == 0 else 1, previous_rate if i == 0 else rate, expand
                ))
                c_in = c_out
        features.append(conv_bn_relu6(c_in, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))


def vainf_mobilenet_backbone(arch: str, output_stride: int) -> nn.Module:
    """The backbone as VainF's modeling.py makes it: slice `features` (a slice of an nn.Sequential
    keeps its children's names: blocks 0-3 and 4-17, the last conv dropped), set the classifier
    network's own parts to None (gone from the state_dict), and wrap in IntermediateLayerGetter,
    which keeps every child up to the last one returned: v3 keeps `low_level_features` too."""
    net = VainFMobileNetV2(output_stride)
    net.low_level_features = net.features[0:4]
    net.high_level_features = net.features[4:-1]
    net.features = None
    net.classifier = None
    returned = {"high_level_features": "out"}
    if arch == "deeplabv3plus":
        returned["low_level_features"] = "low_level"
    return IntermediateLayerGetter(net, returned)


def vainf_resnet_backbone(arch: str, backbone: str, output_stride: int) -> nn.Module:
    """VainF's resnet.py is torchvision's; no multi-grid, dilation by replace_stride_with_dilation.
    IntermediateLayerGetter keeps conv1 .. layer4 (avgpool and fc are cut off)."""
    dilate = [False, True, True] if output_stride == 8 else [False, False, True]
    net = getattr(torchvision.models, backbone)(replace_stride_with_dilation=dilate)
    returned = {"layer4": "out"}
    if arch == "deeplabv3plus":
        returned["layer1"] = "low_level"
    return IntermediateLayerGetter(net, returned)


class VainFModel(nn.Module):
    """VainF's `DeepLabV3` (`_SimpleSegmentationModel`): backbone, classifier, logits resized to
    the input. `separable`: main.py's `--separable_conv` (v3+ only)."""

    def __init__(self, arch: str, backbone: str, num_classes: int, output_stride: int, separable: bool = False) -> None:
        super().__init__()
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
        if backbone == "mobilenetv2":
            self.backbone = vainf_mobilenet_backbone(arch, output_stride)
            channels, low_channels = 320, 24
        else:
            self.backbone = vainf_resnet_backbone(arch, backbone, output_stride)
            channels, low_channels = 2048, 256
        if arch == "deeplabv3":
            self.classifier: nn.Module = VainFV3Head(channels, num_classes, rates)
        else:
            self.classifier = VainFV3PlusHead(channels, low_channels, num_classes, rates, separable)

    def forward(self, x: Tensor) -> Tensor:
        out = self.classifier(self.backbone(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def vainf_states() -> dict[tuple[str, str], dict[str, Tensor]]:
    """One random VainF state_dict per (arch, backbone), shared by both output strides."""
    return {}


def vainf_state(cache: dict, arch: str, backbone: str) -> dict[str, Tensor]:
    if (arch, backbone) not in cache:
        torch.manual_seed(0)
        reference = VainFModel(arch, backbone, 21, 16)
        perturb_batchnorm(reference)
        cache[arch, backbone] = reference.state_dict()
    return cache[arch, backbone]


def vainf_reference(cache: dict, arch: str, backbone: str, output_stride: int) -> VainFModel:
    """The peer's network with the shared random weights (no second random init: built on meta)."""
    state = vainf_state(cache, arch, backbone)
    with torch.device("meta"):
        reference = VainFModel(arch, backbone, 21, output_stride)
    reference.load_state_dict(state, assign=True)
    return reference.eval()


VAINF_CASES = [
    (arch, backbone, output_stride)
    for backbone in ("resnet50", "resnet101")
    for arch in ("deeplabv3", "deeplabv3plus")
    for output_stride in (16, 8)
] + [(arch, "mobilenetv2", output_stride) for arch in ("deeplabv3", "deeplabv3plus") for output_stride in (16, 8)]


# The layout of VainF's files, counted from its source (network/modeling.py, _deeplab.py,
# backbone/*.py): a conv without bias is 1 tensor, a BatchNorm 5 (weight, bias, running_mean,
# running_var, num_batches_tracked). MobileNetV2 (blocks 0-17): stem 6 + block 1 (depthwise
# conv-BN, 1x1, BN) 12 + 16 blocks x 18 = 306. ResNet conv1 .. layer4: 6 + 18 per block + 6 per
# downsample = 318 (R50) / 624 (R101). ASPP: five conv-BN branches + the projection = 36; the v3
# head adds a 3x3 conv-BN and the biased 1x1 (44), the v3+ head the 48-ch projection too (50).
# VainF's own networks at commit 4e1087d have these counts (350, 356, 362, 368, 668, 674) and the
# same key lists, in order, as these references.
VAINF_BACKBONE_TENSORS = {"mobilenetv2": 306, "resnet50": 318, "resnet101": 624}
VAINF_HEAD_TENSORS = {"deeplabv3": 44, "deeplabv3plus": 50}
VAINF_BACKBONE_KEYS = {
    "mobilenetv2": {
        "backbone.low_level_features.0.0.weight": (32, 3, 3, 3),
        "backbone.low_level_features.1.conv.0.0.weight": (32, 1, 3, 3),  # block 1: no expansion
        "backbone.low_level_features.3.conv.3.running_var": (24,),
        "backbone.high_level_features.4.conv.0.0.weight": (144, 24, 1, 1),  # not renumbered from 0
        "backbone.high_level_features.17.conv.2.weight": (320, 960, 1, 1),
    },
    "resnet50": {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer3.5.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer4.2.bn3.running_mean": (2048,),
    },
    "resnet101": {
        "backbone.bn1.num_batches_tracked": (),
        "backbone.layer3.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer4.0.downsample.1.weight": (2048,),
    },
}
VAINF_HEAD_KEYS = {
    "deeplabv3": {
        "classifier.classifier.0.convs.0.0.weight": (256, "C", 1, 1),
        "classifier.classifier.0.convs.3.0.weight": (256, "C", 3, 3),
        "classifier.classifier.0.convs.4.1.weight": (256, "C", 1, 1),  # image pooling: conv after the pool
        "classifier.classifier.0.project.0.weight": (256, 1280, 1, 1),
        "classifier.classifier.1.weight": (256, 256, 3, 3),
        "classifier.classifier.4.bias": (21,),
    },
    "deeplabv3plus": {
        "classifier.project.0.weight": (48, "L", 1, 1),
        "classifier.aspp.convs.3.0.weight": (256, "C", 3, 3),
        "classifier.aspp.project.1.running_var": (256,),
        "classifier.classifier.0.weight": (256, 304, 3, 3),  # one 3x3 conv on [low 48, ASPP 256]
        "classifier.classifier.3.bias": (21,),
    },
}


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50", "resnet101"])
@pytest.mark.parametrize("arch", ["deeplabv3", "deeplabv3plus"])
def test_vainf_reference_has_the_peers_key_layout(arch, backbone, output_stride):
    """The reference's state_dict is the layout of a file VainF's main.py saves: the importer is
    tested against the real key names, not against our own idea of them."""
    with torch.device("meta"):
        state = VainFModel(arch, backbone, 21, output_stride).state_dict()
    assert len(state) == VAINF_BACKBONE_TENSORS[backbone] + VAINF_HEAD_TENSORS[arch]
    channels = {"C": 320 if backbone == "mobilenetv2" else 2048, "L": 24 if backbone == "mobilenetv2" else 256}
    expected = {**VAINF_BACKBONE_KEYS[backbone], **VAINF_HEAD_KEYS[arch]}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == tuple(channels.get(d, d) for d in shape), key
    if backbone == "mobilenetv2":
        blocks = {part: {int(k.split(".")[2]) for k in state if k.startswith(f"backbone.{part}_level_features.")}
                  for part in ("low", "high")}
        assert blocks == {"low": set(range(4)), "high": set(range(4, 18))}  # the 1x1 conv to 1280 (18) dropped
        assert not any(k.startswith(("backbone.features.", "backbone.classifier.")) for k in state)  # set to None
    else:
        assert not any(k.startswith(("backbone.fc.", "backbone.avgpool")) for k in state)


def test_vainf_separable_reference_key_layout():
    """main.py's --separable_conv: every 3x3 conv of the v3+ head becomes `body` = (depthwise,
    pointwise); 4 more tensors than the plain head (360 in VainF's own network too)."""
    with torch.device("meta"):
        state = VainFModel("deeplabv3plus", "mobilenetv2", 21, 16, separable=True).state_dict()
    assert len(state) == 306 + 50 + 4
    assert tuple(state["classifier.aspp.convs.1.0.body.0.weight"].shape) == (320, 1, 3, 3)
    assert tuple(state["classifier.aspp.convs.1.0.body.1.weight"].shape) == (256, 320, 1, 1)
    assert tuple(state["classifier.classifier.0.body.1.weight"].shape) == (256, 304, 1, 1)
    assert "classifier.classifier.0.weight" not in state and "classifier.aspp.convs.4.1.weight" in state


@pytest.mark.parametrize(
    ("renumber", "found"),
    [(lambda part, i: i - 4 if part == "high" else i, "0-3 / 0-13"),  # slices renumbered from 0
     (lambda part, i: i + 1 if part == "high" else i, "0-3 / 5-18")],
)
def test_vainf_mobilenet_other_layouts_are_refused_in_one_line(vainf_states, renumber, found):
    state = vainf_state(vainf_states, "deeplabv3", "mobilenetv2")

    def rename(key: str) -> str:
        parts = key.split(".")
        if parts[1] in ("low_level_features", "high_level_features"):
            parts[2] = str(renumber(parts[1].split("_")[0], int(parts[2])))
        return ".".join(parts)

    with pytest.raises(ValueError) as error:
        from_vainf({rename(k): v for k, v in state.items()}, "deeplabv3", "mobilenetv2", 21)
    message = str(error.value)
    assert f"hold blocks {found}, VainF's modeling.py saves 0-3 / 4-17" in message and "\n" not in message


@pytest.mark.parametrize(("arch", "backbone", "output_stride"), VAINF_CASES)
def test_from_vainf_same_logits(vainf_states, arch, backbone, output_stride):
    reference = vainf_reference(vainf_states, arch, backbone, output_stride)
    ours = from_vainf(vainf_checkpoint(reference), arch, backbone, 21, output_stride=output_stride)
    assert ours.config["arch"] == arch and ours.config["output_stride"] == output_stride
    size = SIZE if backbone == "mobilenetv2" else RESNET_SIZE
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = reference(x)
        actual = ours.eval()(x)
    assert actual.shape == expected.shape == (1, 21, *size)
    assert relative_difference(actual, expected) < TOLERANCE


def test_vainf_mobilenet_padding_matters(vainf_states):
    """The config alone rebuilds the converted network; and the padding options are what makes
    MobileNetV2 exact: with torchvision's padding the logits differ."""
    reference = vainf_reference(vainf_states, "deeplabv3plus", "mobilenetv2", 16)
    ours = from_vainf(reference.state_dict(), "deeplabv3plus", "mobilenetv2", 21)
    rebuilt = build_model(**ours.config)
    rebuilt.load_state_dict(ours.state_dict())
    plain = build_model(**{**ours.config, "stem_padding": 1, "block_padding": "depthwise"})
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        expected = reference(x)
        assert relative_difference(rebuilt.eval()(x), expected) < TOLERANCE
        assert relative_difference(plain.eval()(x), expected) > 1e-3


@pytest.mark.parametrize("output_stride", [16, 8])
def test_from_vainf_separable_same_logits(output_stride):
    torch.manual_seed(3)
    reference = VainFModel("deeplabv3plus", "mobilenetv2", 21, output_stride, separable=True)
    perturb_batchnorm(reference)
    ours = from_vainf(vainf_checkpoint(reference), "deeplabv3plus", "mobilenetv2", 21, output_stride)
    assert ours.config["separable"] is True and ours.config["separable_depthwise_bn"] is False
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert relative_difference(ours.eval()(x), reference.eval()(x)) < TOLERANCE


def _with_backbone(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A VainF head on another backbone (its first tensor names are enough for the refusal)."""
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    return {f"backbone.{prefix}.weight": torch.zeros(1), **head}


def test_other_vainf_variants_are_refused_naming_the_difference(vainf_states):
    v3 = vainf_state(vainf_states, "deeplabv3", "mobilenetv2")
    # convert_to_separable_conv applied to a v3 head (main.py does it for v3+ only).
    separable_v3 = {k.replace(".convs.1.0.weight", ".convs.1.0.body.0.weight"): v for k, v in v3.items()}
    cases = [
        (separable_v3, "deeplabv3", "mobilenetv2", "VainF's deeplabv3 with separable convs in its head"),
        (_with_backbone(v3, "block1.rep.1.conv1"), "deeplabv3", "resnet101",
         "deeplabv3 with xception is not supported (Cadene's original Xception"),
        (_with_backbone(v3, "stage4.0.branches.0.0.conv1"), "deeplabv3", "resnet101",
         "deeplabv3 with hrnetv2 is not supported (no HRNet backbone here)"),
    ]
    for state, arch, backbone, message in cases:
        with pytest.raises(ValueError) as error:
            from_vainf(state, arch, backbone, 21)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_from_vainf_says_what_the_file_holds(vainf_states):
    state = vainf_state(vainf_states, "deeplabv3", "resnet50")
    with pytest.raises(ValueError, match="holds VainF's deeplabv3 with resnet50 and 21 classes, not deeplabv3plus"):
        from_vainf(state, "deeplabv3plus", "resnet50", 21)
    with pytest.raises(ValueError, match="21 classes, not deeplabv3 with resnet50 and 19 classes"):
        from_vainf(state, "deeplabv3", "resnet50", 19)


# --------------------------------------------------------------------------- kazuto1011 reference

KAZUTO_LAYERS = (("layer2", 3, 256, 1, 1), ("layer3", 4, 512, 2, 1), ("layer4", 23, 1024, 1, 2), ("layer5", 3, 2048, 1, 4))
KAZUTO_RATES = (6, 12, 18, 24)


def kazuto_state_dict(num_classes: int) -> dict[str, Tensor]:
    """`DeepLabV2_ResNet101_MSC().state_dict()` layout with random weights, built from kazuto's
    naming: `_ConvBnReLU` = (conv, bn); blocks (reduce, conv3x3, increase, shortcut); `aspp.cN`."""
    generator = torch.Generator().manual_seed(0)
    state: dict[str, Tensor] = {}

    def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    def conv_bn(prefix: str, c_in: int, c_out: int, kernel: int) -> None:
        fan_in = c_in * kernel * kernel
        state[f"{prefix}.conv.weight"] = torch.randn(c_out, c_in, kernel, kernel, generator=generator) * math.sqrt(1 / fan_in)
        state[f"{prefix}.bn.weight"] = uniform((c_out,), 0.5, 1.0)
        state[f"{prefix}.bn.bias"] = uniform((c_out,), -0.1, 0.1)
        state[f"{prefix}.bn.running_mean"] = uniform((c_out,), -0.2, 0.2)
        state[f"{prefix}.bn.running_var"] = uniform((c_out,), 0.5, 1.5)
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)

    conv_bn("layer1.conv1", 3, 64, 7)
    c_in = 64
    for layer, blocks, c_out, _, _ in KAZUTO_LAYERS:
        for i in range(blocks):
            prefix = f"{layer}.block{i + 1}"
            conv_bn(f"{prefix}.reduce", c_in, c_out // 4, 1)
            conv_bn(f"{prefix}.conv3x3", c_out // 4, c_out // 4, 3)
            conv_bn(f"{prefix}.increase", c_out // 4, c_out, 1)
            if i == 0:
                conv_bn(f"{prefix}.shortcut", c_in, c_out, 1)
            c_in = c_out
    for i in range(len(KAZUTO_RATES)):
        state[f"aspp.c{i}.weight"] = torch.randn(num_classes, 2048, 3, 3, generator=generator) * 0.01
        state[f"aspp.c{i}.bias"] = uniform((num_classes,), -0.1, 0.1)
    return {f"base.{k}": v for k, v in state.items()}


def kazuto_base(x: Tensor, state: dict[str, Tensor]) -> Tensor:
    """Caffe/MSRA DeepLabV2, functionally: stride in the 1x1 `reduce` conv, every block of a dilated
    stage at its rate, ceil-mode max-pool, four biased atrous branches summed (stride-8 scores)."""

    def conv_bn(h: Tensor, prefix: str, stride: int = 1, padding: int = 0, dilation: int = 1, relu: bool = True) -> Tensor:
        h = F.conv2d(h, state[f"{prefix}.conv.weight"], None, stride, padding, dilation)
        h = F.batch_norm(h, state[f"{prefix}.bn.running_mean"], state[f"{prefix}.bn.running_var"],
                         state[f"{prefix}.bn.weight"], state[f"{prefix}.bn.bias"], False, 0.0, 1e-5)
        return F.relu(h) if relu else h

    h = F.max_pool2d(conv_bn(x, "base.layer1.conv1", 2, 3), 3, 2, 1, ceil_mode=True)
    for layer, blocks, _, stride, rate in KAZUTO_LAYERS:
        for i in range(blocks):
            prefix = f"base.{layer}.block{i + 1}"
            s = stride if i == 0 else 1
            out = conv_bn(h, f"{prefix}.reduce", s)
            out = conv_bn(out, f"{prefix}.conv3x3", 1, rate, rate)
            out = conv_bn(out, f"{prefix}.increase", relu=False)
            shortcut = conv_bn(h, f"{prefix}.shortcut", s, relu=False) if i == 0 else h
            h = F.relu(out + shortcut)
    return sum(F.conv2d(h, state[f"base.aspp.c{i}.weight"], state[f"base.aspp.c{i}.bias"], padding=r, dilation=r)
               for i, r in enumerate(KAZUTO_RATES))


def kazuto_msc(x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """kazuto's MSC: the base on x and on x resized by scale_factor 0.5 / 0.75; pixel-wise max at
    the scale-1 score-map size (its output: stride-8 logits), upsampled to the input as its demo
    does. Also returns the other fusion (each scale upsampled to the input first, then max)."""
    size = x.shape[-2:]
    logits = kazuto_base(x, state)
    pyramid = [kazuto_base(F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False), state)
               for p in (0.5, 0.75)]

    def upsample(scores: Tensor, to: tuple[int, ...]) -> Tensor:
        return F.interpolate(scores, size=to, mode="bilinear", align_corners=False)

    at_score_map = torch.stack([logits, *(upsample(p, logits.shape[-2:]) for p in pyramid)]).amax(dim=0)
    at_input_size = torch.stack([upsample(p, size) for p in (logits, *pyramid)]).amax(dim=0)
    return upsample(at_score_map, size), at_input_size


@pytest.fixture(scope="module")
def kazuto() -> dict[str, Tensor]:
    return kazuto_state_dict(num_classes=21)


# conv1 output 17 x 20: the ceil-mode pool differs in width; 0.75 x (33, 39) is not integral, so
# sizing the pyramid by size= or by scale_factor= differs too.
KAZUTO_SIZE = (33, 39)


def test_from_kazuto_same_logits_with_msc(kazuto):
    model = from_kazuto(kazuto, num_classes=21).eval()
    config = model.config
    assert config["msc_scales"] == [1.0, 0.75, 0.5] and config["msc_fusion"] == "score_map"
    with torch.device("meta"):
        assert repr(build_model(**config)) == repr(model)  # the config alone rebuilds the network
    mean, std = torch.tensor(config["input_mean"]), torch.tensor(config["input_std"])
    assert torch.allclose(mean * 255, torch.tensor(KAZUTO_MEAN_BGR[::-1])) and torch.allclose(std * 255, torch.ones(3))
    torch.manual_seed(2)
    rgb = torch.rand(1, 3, *KAZUTO_SIZE)  # an RGB image scaled to [0, 1]
    bgr_caffe = rgb.flip(1) * 255 - torch.tensor(KAZUTO_MEAN_BGR).view(1, 3, 1, 1)
    ours_input = (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # what the batch job feeds
    with torch.no_grad():
        expected, fused_at_input_size = kazuto_msc(bgr_caffe, kazuto)
        actual = model(ours_input)
    assert relative_difference(actual, expected) < TOLERANCE
    # The fusion resolution matters: fusing after upsampling each scale gives other logits.
    assert relative_difference(fused_at_input_size, expected) > 1e-4


def test_from_kazuto_without_msc(kazuto, tmp_path):
    base = {k.removeprefix("base."): v for k, v in kazuto.items()}
    torch.save(base, tmp_path / "deeplabv2_base.pth")
    model = from_kazuto(str(tmp_path / "deeplabv2_base.pth"), num_classes=21).eval()
    assert not model.config["msc_scales"]
    rgb = torch.rand(1, 3, *KAZUTO_SIZE)
    bgr_caffe = rgb.flip(1) * 255 - torch.tensor(KAZUTO_MEAN_BGR).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.interpolate(kazuto_base(bgr_caffe, kazuto), size=KAZUTO_SIZE, mode="bilinear", align_corners=False)
        actual = model(rgb * 255 - torch.tensor(KAZUTO_MEAN_BGR[::-1]).view(1, 3, 1, 1))
    assert relative_difference(actual, expected) < TOLERANCE
    with pytest.raises(ValueError, match="21 classes; asked for 19"):
        from_kazuto(base, num_classes=19)


PEER_OPTIONS = [
    ("deeplabv2", "resnet18", {"dilate_first_block": True, "maxpool_ceil_mode": True, "msc_scales": (1, 0.75, 0.5),
                               "msc_fusion": "score_map", "msc_resize": "scale_factor"}),
    ("deeplabv3plus", "mobilenetv2", {"width_mult": 0.25, "stem_padding": 0, "block_padding": "input",
                                      "decoder_convs": 1, "decoder_concat": "low_first", "separable": True,
                                      "separable_depthwise_bn": False}),
]


@pytest.mark.parametrize(("arch", "backbone", "opts"), PEER_OPTIONS)
def test_peer_options_script(arch, backbone, opts):
    torch.manual_seed(0)
    model = build_model(arch, backbone, num_classes=3, **opts).eval()
    x = torch.rand(1, 3, *KAZUTO_SIZE)
    with torch.no_grad():
        expected = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            torch.testing.assert_close(torch.jit.script(model)(x), expected)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"backbone": "resnet18", "stride_in": "1x1"}, "needs bottleneck blocks"),
        ({"backbone": "resnet18", "stride_in": "2x2"}, "choose from: 3x3, 1x1"),
        ({"backbone": "resnet18", "msc_scales": (0.75, 0.5), "msc_fusion": "score_map"}, "must include 1"),
        ({"backbone": "resnet18", "msc_fusion": "logits"}, "choose from: input_size, score_map"),
        ({"arch": "deeplabv3plus", "backbone": "mobilenetv2", "block_padding": "same"}, "choose from: depthwise, input"),
        ({"arch": "deeplabv3plus", "backbone": "resnet18", "decoder_concat": "low"}, "aspp_first, low_first"),
    ],
)
def test_invalid_peer_options(opts, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        build_model(**{"arch": "deeplabv2", **opts})


# --------------------------------------------------------------------------- clear errors


def test_unknown_checkpoint_says_what_it_found():
    junk = {"epoch": 3, "net": {"encoder.conv.weight": torch.zeros(1), "encoder.conv.bias": torch.zeros(1)}}
    with pytest.raises(ValueError) as error:
        from_vainf(junk, "deeplabv3plus", "resnet101", 21)
    message = str(error.value)
    assert "is not a VainF/DeepLabV3Plus-Pytorch" in message and "not recognised" in message and "from_kazuto" in message
    assert "top-level keys: epoch (int), net (dict)" in message and "encoder.conv.weight" in message


def test_kazuto_reference_has_the_peers_key_layout(kazuto):
    """kazuto's `DeepLabV2_ResNet101_MSC().state_dict()`: 632 tensors (the same list, in order, as
    kazuto's own network at commit 4219467), `_ConvBnReLU` = (conv, bn), a `shortcut` only in a
    stage's first block (the others are nn.Identity), ASPP branches `aspp.c0-3` with bias."""
    assert len(kazuto) == 632
    shapes = {
        "base.layer1.conv1.conv.weight": (64, 3, 7, 7),
        "base.layer1.conv1.bn.num_batches_tracked": (),
        "base.layer2.block1.shortcut.conv.weight": (256, 64, 1, 1),  # stride 1, still a projection
        "base.layer3.block1.reduce.conv.weight": (128, 256, 1, 1),  # the stride sits in this 1x1
        "base.layer4.block23.increase.bn.running_var": (1024,),
        "base.layer5.block3.conv3x3.conv.weight": (512, 512, 3, 3),
        "base.aspp.c3.weight": (21, 2048, 3, 3),
        "base.aspp.c3.bias": (21,),
    }
    for key, shape in shapes.items():
        assert tuple(kazuto[key].shape) == shape, key
    assert not any(".block2.shortcut." in k or k.startswith(("base.layer1.pool", "base.fc")) for k in kazuto)


# Key names that tell kazuto's other networks apart (tensor values do not matter for the refusal).
KAZUTO_OTHERS = {
    "DeepLabV3 with MSC": ["base.layer1.conv1.conv.weight", "base.aspp.stages.c0.conv.weight",
                           "base.aspp.stages.imagepool.conv.conv.weight", "base.fc1.conv.weight", "base.fc2.weight"],
    "DeepLabV3+ with MSC": ["base.layer1.conv1.conv.weight", "base.aspp.stages.c0.conv.weight", "base.fc1.conv.weight",
                            "base.reduce.conv.weight", "base.fc2.conv1.conv.weight"],
    "DeepLabV1 / ResNet": ["layer1.conv1.conv.weight", "layer5.block3.increase.conv.weight", "fc.weight", "fc.bias"],
}


@pytest.mark.parametrize(("name", "why"), [
    ("DeepLabV3 with MSC", "ours has a 3x3 conv-BN-ReLU between"),
    ("DeepLabV3+ with MSC", "kazuto releases no weights for it"),
    ("DeepLabV1 / ResNet", "our deeplabv1 is VGG-16 LargeFOV"),
])
def test_kazutos_other_networks_are_refused_in_one_line(name, why):
    state = {k: torch.zeros(1) for k in KAZUTO_OTHERS[name]}
    with pytest.raises(ValueError) as error:
        from_kazuto(state, 21)
    message = str(error.value)
    assert f"kazuto1011/deeplab-pytorch {name} is not supported: " in message and why in message and "\n" not in message
    with pytest.raises(ValueError, match=f"looks like a kazuto1011/deeplab-pytorch {re.escape(name)}: no importer reads it"):
        from_vainf(state, "deeplabv3plus", "resnet101", 21)


def test_a_peer_file_given_to_the_wrong_importer_names_the_right_one(kazuto, vainf_states):
    with pytest.raises(ValueError, match=r"kazuto1011/deeplab-pytorch DeepLabV2 with MSC: use deeplab_core\.weights\.from_kazuto"):
        from_vainf(kazuto, "deeplabv3plus", "resnet101", 21)
    vainf = vainf_checkpoint(VainFModel("deeplabv3plus", "mobilenetv2", 21, 16))
    with pytest.raises(ValueError, match=r"VainF.*training checkpoint.*use deeplab_core\.weights\.from_vainf"):
        from_kazuto(vainf, 21)


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
def test_pretrained_refuses_a_whole_peer_model(tmp_path, backbone):
    path = tmp_path / "best_deeplabv3plus.pth"
    torch.save(vainf_checkpoint(VainFModel("deeplabv3plus", backbone, 21, 16)), path)
    with pytest.raises(ValueError, match=r"whole VainF.*pretrained= loads a backbone.*use deeplab_core\.weights\.from_vainf"):
        build_model("deeplabv3plus", backbone, pretrained=str(path))


def test_pretrained_refuses_a_pickled_module(tmp_path):
    torch.save(nn.Conv2d(3, 4, 1), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"pickled Python objects .*whole nn\.Module.*state_dict\(\)"):
        build_model("deeplabv3", "resnet18", pretrained=str(tmp_path / "module.pt"))


def _zeros_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


def test_torchvision_mobilenet_v3_is_refused_briefly():
    with torch.device("meta"):
        reference = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=21, aux_loss=True
        )
    state = {k: v for k, v in reference.state_dict().items()}
    for backbone in (None, "resnet101", "mobilenetv2"):
        with pytest.raises(ValueError) as error:
            from_torchvision(state, backbone=backbone)
        message = str(error.value)
        assert "deeplabv3_mobilenet_v3_large is not supported" in message
        assert "deeplabv3_resnet50 and deeplabv3_resnet101" in message
        assert "multi_grid" not in message and len(message) < 1000


def test_torchvision_backbone_is_read_from_the_file_and_differences_are_summarised():
    with torch.device("meta"):
        reference = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4)
    state = _zeros_state(reference)
    assert from_torchvision(state, num_classes=4).config["backbone"] == "resnet50"
    del state["classifier.4.bias"]
    with pytest.raises(ValueError) as error:
        from_torchvision(state, num_classes=5)
    message = str(error.value)
    assert "missing (1): classifier.4.bias" in message and "shape mismatch" in message and len(message) < 1000


# --------------------------------------------------------------------------- class lists and label tables


def test_cityscapes_tables_match_cityscapesscripts():
    from cityscapesscripts.helpers import labels as official

    from deeplab_core.datasets import (
        CITYSCAPES_CLASSES,
        CITYSCAPES_COLORS,
        CITYSCAPES_LABEL_TO_TRAIN_ID,
        CITYSCAPES_LABELS,
        cityscapes_palette,
        cityscapes_train_ids,
    )

    assert [(l.name, l.id, l.train_id, l.color) for l in CITYSCAPES_LABELS] == [
        (l.name, l.id, l.trainId, tuple(l.color)) for l in official.labels
    ]
    expected = np.full(256, 255, dtype=np.uint8)
    for label in official.labels:
        if label.id >= 0:
            expected[label.id] = 255 if label.trainId in (255, -1) else label.trainId
    assert np.array_equal(CITYSCAPES_LABEL_TO_TRAIN_ID, expected)
    trained = {l.trainId: l for l in official.labels if l.trainId not in (255, -1)}
    assert CITYSCAPES_CLASSES == tuple(trained[i].name for i in range(19))
    assert CITYSCAPES_COLORS == tuple(tuple(trained[i].color) for i in range(19))
    assert cityscapes_palette()[:6] == [128, 64, 128, 244, 35, 232] and len(cityscapes_palette()) == 768
    raw = np.array([[0, 7, 8, 33], [34, 255, 26, 29]], dtype=np.uint8)  # a *_gtFine_labelIds.png array
    assert cityscapes_train_ids(raw).tolist() == [[255, 0, 1, 18], [255, 255, 13, 255]]
    assert cityscapes_train_ids(np.array([-1, 1000, 24])).tolist() == [255, 255, 11]


def test_voc_classes():
    from deeplab_core.datasets import VOC_CLASSES

    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"
