"""The model zoo: shapes, output strides, parameter counts, gradients, export, options, errors."""

import json
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

from deeplab_core.models import ARCHS, BACKBONES, DeepLabV2, build_model, param_groups
from deeplab_core.models.ops import SeparableConv2d, resize

VALID = [(arch, backbone) for arch, spec in ARCHS.items() for backbone in spec.backbones]
# Small variants where the test is about the head, not the backbone's size.
TINY = {"mobilenetv2": {"width_mult": 0.25}}
SMALL_INPUT = (65, 97)

# Default options, 21 classes, default output stride (mobilenetv2 at width 1.0). Counted once with
# this code; the torchvision-comparable ones are also checked against torchvision below.
PARAM_COUNTS = {
    ("deeplabv1", "vgg16"): 20_505_429,
    ("deeplabv2", "resnet101"): 44_048_532,
    ("deeplabv2", "resnet50"): 25_056_404,
    ("deeplabv2", "resnet18"): 11_563_668,
    ("deeplabv2", "vgg16"): 37_877_652,
    ("deeplabv3", "resnet18"): 15_904_085,
    ("deeplabv3", "resnet50"): 39_638_869,
    ("deeplabv3", "resnet101"): 58_630_997,
    ("deeplabv3", "xception65"): 53_998_149,
    ("deeplabv3", "mobilenetv2"): 5_113_877,
    ("deeplabv3plus", "resnet18"): 16_608_181,
    ("deeplabv3plus", "resnet50"): 40_352_181,
    ("deeplabv3plus", "resnet101"): 59_344_309,
    ("deeplabv3plus", "xception65"): 54_705_317,
    ("deeplabv3plus", "mobilenetv2"): 5_816_053,
}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(arch: str, backbone: str, **opts) -> nn.Module:
    return build_model(arch, backbone, num_classes=3, **{**TINY.get(backbone, {}), **opts})


def test_param_counts_cover_every_valid_combination():
    assert set(PARAM_COUNTS) == set(VALID)
    with torch.device("meta"):
        counts = {(arch, backbone): count(build_model(arch, backbone)) for arch, backbone in VALID}
    assert counts == PARAM_COUNTS


@pytest.mark.parametrize("depth", [50, 101])
def test_deeplabv3_matches_torchvision_parameter_counts(depth):
    torchvision_configuration = {"output_stride": 8, "multi_grid": None, "aspp_rates": (12, 24, 36), "aspp_dropout": 0.5}
    with torch.device("meta"):
        for aux in (False, True):
            ours = build_model("deeplabv3", f"resnet{depth}", aux=aux, **torchvision_configuration)
            reference = getattr(torchvision.models.segmentation, f"deeplabv3_resnet{depth}")(
                weights=None, weights_backbone=None, num_classes=21, aux_loss=aux
            )
            assert count(ours) == count(reference)
            if depth == 101:
                assert count(ours) == (60_996_202 if aux else 58_630_997)  # 58.6M without aux


def _torchvision_backbone_state(backbone: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the torchvision classification model's parameters that a DeepLab backbone keeps."""
    if backbone == "mobilenetv2":
        net = torchvision.models.mobilenet_v2()
        return {k: v.shape for k, v in net.state_dict().items() if k.startswith("features.") and not k.startswith("features.18.")}
    net = getattr(torchvision.models, backbone)()
    keep = "features." if backbone == "vgg16" else ("conv1", "bn1", "layer")
    return {k: v.shape for k, v in net.state_dict().items() if k.startswith(keep)}


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18", "resnet50", "resnet101", "mobilenetv2"])
def test_backbone_state_dict_is_torchvisions(backbone):
    arch = "deeplabv1" if backbone == "vgg16" else "deeplabv3plus"
    with torch.device("meta"):
        ours = {k: v.shape for k, v in build_model(arch, backbone).backbone.state_dict().items()}
        assert ours == _torchvision_backbone_state(backbone)


@pytest.mark.parametrize(("arch", "backbone"), VALID)
def test_output_is_logits_at_odd_input_size(arch, backbone):
    torch.manual_seed(0)
    model = tiny(arch, backbone).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *SMALL_INPUT))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 3, *SMALL_INPUT)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("arch", "backbone", "size"),
    [
        ("deeplabv3plus", "mobilenetv2", (321, 481)),
        ("deeplabv3plus", "mobilenetv2", (513, 513)),
        ("deeplabv3", "resnet18", (321, 481)),
        ("deeplabv2", "resnet18", (321, 481)),
    ],
)
def test_output_at_training_and_eval_sizes(arch, backbone, size):
    model = tiny(arch, backbone).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, *size)).shape == (1, 3, *size)


BACKBONE_STRIDES = [(b, s) for b in ("vgg16", "resnet18", "resnet101", "xception65", "mobilenetv2") for s in BACKBONES[b].output_strides]


@pytest.mark.parametrize(("backbone", "output_stride"), BACKBONE_STRIDES)
def test_backbone_output_stride(backbone, output_stride):
    arch = "deeplabv1" if backbone == "vgg16" else "deeplabv3plus"
    model = tiny(arch, backbone, output_stride=output_stride).eval()
    h, w = SMALL_INPUT
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, h, w))
    # Every stride-2 layer here maps n to ceil(n / 2).
    assert features["out"].shape[-2:] == (math.ceil(h / output_stride), math.ceil(w / output_stride))
    if "low" in features:
        assert features["low"].shape[-2:] == (math.ceil(h / 4), math.ceil(w / 4))
    if "aux" in features:  # resnet layer3: same stride as layer4 at OS 8 and 16
        assert features["aux"].shape[-2:] == features["out"].shape[-2:]


def _rates(layer: nn.Module) -> list[int]:
    return [block.conv2.dilation[0] for block in layer]


def test_resnet_dilation_and_multi_grid():
    with torch.device("meta"):
        os16 = build_model("deeplabv3", "resnet101").backbone
        os8 = build_model("deeplabv3", "resnet101", output_stride=8).backbone
        plain = build_model("deeplabv3", "resnet101", multi_grid=None).backbone
        v2 = build_model("deeplabv2", "resnet101").backbone
    assert _rates(os16.layer4) == [2, 4, 8] and set(_rates(os16.layer3)) == {1}
    assert _rates(os8.layer4) == [4, 8, 16] and _rates(os8.layer3) == [1] + [2] * 22
    # torchvision v1.5: the first block of a dilated stage keeps the previous dilation.
    assert _rates(plain.layer4) == [1, 2, 2]
    assert _rates(v2.layer3) == [1] + [2] * 22 and _rates(v2.layer4) == [2, 4, 4]
    assert all(block.conv2.padding == block.conv2.dilation for block in os8.layer4)
    with pytest.raises(ValueError, match="one rate per block"):
        build_model("deeplabv3", "resnet101", multi_grid=(1, 2))


def test_vgg16_is_deeplab_largefov():
    model = build_model("deeplabv1", num_classes=4)
    features = model.backbone.features
    pools = [m for m in features.values() if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3 + [(3, 1, 1)] * 2
    assert [features[str(i)].dilation for i in (24, 26, 28)] == [(2, 2)] * 3
    fc6, fc7, fc8 = model.classifier.fc6, model.classifier.fc7, model.classifier.fc8
    assert (fc6.kernel_size, fc6.dilation, fc6.out_channels) == ((3, 3), (12, 12), 1024)
    assert (fc7.kernel_size, fc7.out_channels, fc8.out_channels) == ((1, 1), 1024, 4)
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_deeplabv2_aspp_rates():
    with torch.device("meta"):
        large = build_model("deeplabv2", "resnet18")
        small = build_model("deeplabv2", "resnet18", aspp="S")
        vgg = build_model("deeplabv2", "vgg16")
    assert [b.dilation[0] for b in large.classifier.branches] == [6, 12, 18, 24]
    assert [b.dilation[0] for b in small.classifier.branches] == [2, 4, 8, 12]
    assert [b.fc6.dilation[0] for b in vgg.classifier.branches] == [6, 12, 18, 24]


def test_deeplabv3_aspp_rates_follow_output_stride():
    with torch.device("meta"):
        for output_stride, rates in ((16, [6, 12, 18]), (8, [12, 24, 36])):
            aspp = build_model("deeplabv3", "resnet18", output_stride=output_stride).classifier[0]
            assert [branch[0].dilation[0] for branch in aspp.convs[1:4]] == rates
        aspp = build_model("deeplabv3plus", "resnet18", aspp_rates=(3, 5, 7)).classifier.aspp
        assert [branch[0].dilation[0] for branch in aspp.convs[1:4]] == [3, 5, 7]


def test_msc_fuses_the_input_pyramid_by_max():
    torch.manual_seed(0)
    scales = (1.0, 0.75, 0.5)
    msc = build_model("deeplabv2", "resnet18", num_classes=3, msc_scales=scales).eval()
    single = build_model("deeplabv2", "resnet18", num_classes=3).eval()
    single.load_state_dict(msc.state_dict())
    x = torch.rand(1, 3, *SMALL_INPUT)
    with torch.no_grad():
        per_scale = [
            resize(single(resize(x, [int(SMALL_INPUT[0] * s), int(SMALL_INPUT[1] * s)])), list(SMALL_INPUT))
            for s in scales
        ]
        expected = torch.stack(per_scale).amax(dim=0)
        torch.testing.assert_close(msc(x), expected)
    assert isinstance(msc, DeepLabV2)


def test_separable_head_uses_atrous_separable_convs():
    with torch.device("meta"):
        plain = build_model("deeplabv3plus", "resnet18")
        separable = build_model("deeplabv3plus", "resnet18", separable=True)
    aspp = separable.classifier.aspp
    assert all(isinstance(branch, SeparableConv2d) for branch in aspp.convs[1:4])
    assert [branch.depthwise.dilation[0] for branch in aspp.convs[1:4]] == [6, 12, 18]
    assert all(isinstance(m, SeparableConv2d) for m in separable.classifier.decoder.fuse)
    assert count(separable) < count(plain)


def test_xception65_layout():
    with torch.device("meta"):
        backbone = build_model("deeplabv3plus", "xception65").backbone
    assert len(backbone.middle_flow) == 16
    assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())
    separable = [m for m in backbone.modules() if isinstance(m, SeparableConv2d)]
    assert separable and all(
        isinstance(s.depthwise_bn, nn.BatchNorm2d) and isinstance(s.depthwise_relu, nn.ReLU) for s in separable
    )
    assert sum(s.depthwise.stride == (2, 2) for s in separable) == 3  # entry flow, at OS 16


def test_aux_head_in_training_only():
    torch.manual_seed(0)
    model = build_model("deeplabv3", "resnet18", num_classes=3, aux=True)
    x = torch.rand(2, 3, *SMALL_INPUT)  # batch 2: the image-pooling BN cannot train on one value
    out = model.train()(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 3, *SMALL_INPUT)
    aux = model.aux_classifier
    assert [type(m) for m in aux] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Conv2d]
    assert aux[0].in_channels == 256 and aux[0].out_channels == 64 and aux[3].p == 0.1
    with torch.no_grad():
        assert isinstance(model.eval()(x), torch.Tensor)
    # Without aux a training model returns a plain tensor too.
    assert isinstance(build_model("deeplabv3", "resnet18", num_classes=3).train()(x), torch.Tensor)


ONE_PER_ARCH = [
    ("deeplabv1", "vgg16", {}),
    ("deeplabv2", "resnet18", {"aux": True, "msc_scales": (1, 0.5)}),
    ("deeplabv3", "resnet18", {"aux": True}),
    ("deeplabv3plus", "mobilenetv2", {"separable": True}),
]
XCEPTION = pytest.param("deeplabv3plus", "xception65", {}, marks=pytest.mark.slow)


@pytest.mark.parametrize(("arch", "backbone", "opts"), [*ONE_PER_ARCH, XCEPTION])
def test_gradients_reach_backbone_and_head(arch, backbone, opts):
    torch.manual_seed(0)
    model = tiny(arch, backbone, **opts).train()
    out = model(torch.rand(2, 3, 65, 65))
    loss = sum(o.square().mean() for o in out.values()) if isinstance(out, dict) else out.square().mean()
    loss.backward()
    backbone_params, head_params = param_groups(model)
    assert backbone_params[0].grad is not None and backbone_params[0].grad.abs().sum() > 0
    assert head_params[-1].grad is not None and head_params[-1].grad.abs().sum() > 0
    if opts.get("aux"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_classifier[-1].parameters())


@pytest.mark.parametrize(("arch", "backbone", "opts"), ONE_PER_ARCH)
def test_export_and_script_match_eager(arch, backbone, opts):
    torch.manual_seed(0)
    model = tiny(arch, backbone, **opts).eval()
    x = torch.rand(1, 3, *SMALL_INPUT)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected)


@pytest.mark.parametrize(("arch", "backbone"), [("deeplabv2", "vgg16"), ("deeplabv3plus", "resnet18")])
def test_eval_mode_is_deterministic(arch, backbone):
    model = tiny(arch, backbone).eval()
    x = torch.rand(1, 3, *SMALL_INPUT)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "choices"),
    [
        ({"arch": "deeplabv4"}, "deeplabv1, deeplabv2, deeplabv3, deeplabv3plus"),
        ({"arch": "deeplabv3", "backbone": "resnet152"}, "resnet18, resnet50, resnet101, xception65, mobilenetv2"),
        ({"arch": "deeplabv1", "backbone": "resnet101"}, "choose from: vgg16"),
        ({"arch": "deeplabv3", "output_stride": 32}, "choose from: 8, 16"),
        ({"arch": "deeplabv2", "backbone": "vgg16", "output_stride": 16}, "choose from: 8"),
        ({"arch": "deeplabv3plus", "backbone": "mobilenetv2", "aux": True}, "choose from: resnet18, resnet50, resnet101"),
        ({"arch": "deeplabv2", "aspp": "M"}, "choose from: L, S"),
        ({"arch": "deeplabv3", "separable": True},
         "aspp_dropout, aspp_rates, dilate_first_block, maxpool_ceil_mode, multi_grid, stride_in"),
        ({"arch": "deeplabv3plus", "backbone": "xception65", "width_mult": 0.5},
         "aspp_dropout, aspp_rates, decoder_concat, decoder_convs, separable"),
    ],
)
def test_invalid_choices_raise_with_the_valid_ones(kwargs, choices):
    with torch.device("meta"), pytest.raises(ValueError) as error:
        build_model(**kwargs)
    assert choices in str(error.value)


@pytest.mark.parametrize(
    ("arch", "backbone", "opts"),
    [("deeplabv2", "vgg16", {"msc_scales": (1, 0.75, 0.5), "aspp": "S"}),
     ("deeplabv3plus", "mobilenetv2", {"width_mult": 0.5, "separable": True, "aspp_rates": (3, 6, 9)}),
     ("deeplabv3", "resnet50", {"output_stride": 8, "multi_grid": None, "aux": True})],
)
def test_config_rebuilds_the_same_model(arch, backbone, opts):
    with torch.device("meta"):
        model = build_model(arch, backbone, num_classes=7, **opts)
        config = json.loads(json.dumps(model.config))
        assert config == model.config
        assert {k: config[k] for k in ("arch", "backbone", "num_classes")} == {"arch": arch, "backbone": backbone, "num_classes": 7}
        rebuilt = build_model(**config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert repr(rebuilt) == repr(model)


def test_param_groups_split_backbone_from_head():
    model = build_model("deeplabv3plus", "resnet18", num_classes=3, aux=True)
    backbone, head = param_groups(model)
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in head)
    assert sum(p.numel() for p in backbone) == count(model.backbone)
    assert {id(p) for p in model.aux_classifier.parameters()} <= {id(p) for p in head}
