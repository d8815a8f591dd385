"""`build_model`: one registry of architectures and one of backbones.

Options (`**opts` of build_model) are the keyword-only parameters of the chosen backbone's
builder (e.g. `multi_grid`, `stride_in`, `width_mult`, `block_padding`) and of the
architecture's builder (e.g. `aspp`, `msc_scales`, `msc_fusion`, `aspp_rates`, `separable`,
`decoder_convs`); anything else is a ValueError that lists the valid ones.

`input_mean` / `input_std` record the normalisation the model's input expects,
`(rgb / 255 - mean) / std` (ImageNet's by default); converted peer models that were trained on
other inputs (e.g. Caffe's BGR 0-255 minus the mean pixel) carry theirs there.
"""

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..loading import load_backbone_weights
from .aspp import ASPPV2, DeepLabHead, LargeFOV
from .deeplab import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus
from .decoder import DeepLabV3PlusHead
from .mobilenetv2 import mobilenetv2_backbone
from .resnet import resnet_backbone
from .vgg import vgg16_backbone
from .xception import xception65_backbone

BackboneBuilder = Callable[..., tuple[nn.Module, dict[str, int]]]


@dataclass(frozen=True)
class BackboneSpec:
    build: BackboneBuilder  # (output_stride, **options) -> (feature extractor, channels by name)
    output_strides: tuple[int, ...]
    imagenet_weights: str | None  # torchvision weights enum entry for pretrained="imagenet"
    aux: bool = False  # has the layer3 ("aux") features the FCN auxiliary head needs
    multi_grid: tuple[int, ...] | None = None  # DeepLabv3/v3+ default unit rates of the last stage


def _resnet(name: str, multi_grid: tuple[int, ...], weights: str) -> BackboneSpec:
    return BackboneSpec(partial(resnet_backbone, name), (8, 16), weights, aux=True, multi_grid=multi_grid)


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(vgg16_backbone, (8,), "VGG16_Weights.IMAGENET1K_V1"),
    # resnet18's last stage has two blocks, so its multi-grid has two unit rates.
    "resnet18": _resnet("resnet18", (1, 2), "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": _resnet("resnet50", (1, 2, 4), "ResNet50_Weights.IMAGENET1K_V1"),
    "resnet101": _resnet("resnet101", (1, 2, 4), "ResNet101_Weights.IMAGENET1K_V1"),
    "xception65": BackboneSpec(xception65_backbone, (8, 16), None),
    "mobilenetv2": BackboneSpec(mobilenetv2_backbone, (8, 16), "MobileNet_V2_Weights.IMAGENET1K_V1"),
}


@dataclass(frozen=True)
class Parts:
    """What every architecture builder receives."""

    backbone: str
    body: nn.Module
    channels: dict[str, int]
    num_classes: int
    output_stride: int
    aux_classifier: nn.Module | None


def _deeplabv1(parts: Parts, *, dropout: float = 0.5) -> nn.Module:
    return DeepLabV1(parts.body, LargeFOV(parts.channels["out"], parts.num_classes, dropout=dropout))


ASPP_V2_RATES = {"L": (6, 12, 18, 24), "S": (2, 4, 8, 12)}


def _deeplabv2(
    parts: Parts,
    *,
    aspp: str = "L",
    msc_scales: Sequence[float] | None = None,
    msc_fusion: str = "input_size",
    msc_resize: str = "size",
) -> nn.Module:
    rates = choose(ASPP_V2_RATES, aspp, "aspp")
    in_channels, num_classes = parts.channels["out"], parts.num_classes
    if parts.backbone == "vgg16":
        # VGG-16 ends at pool5: each branch carries its own fc6-fc7-fc8 (paper, Fig. 4b).
        branches = [LargeFOV(in_channels, num_classes, rate) for rate in rates]
    else:
        branches = [nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate) for rate in rates]
    return DeepLabV2(parts.body, ASPPV2(branches), parts.aux_classifier, msc_scales or (), msc_fusion, msc_resize)


def _aspp_rates(output_stride: int, aspp_rates: Sequence[int] | None) -> tuple[int, ...]:
    """(6, 12, 18) at output stride 16, doubled at 8."""
    if aspp_rates is not None:
        return tuple(aspp_rates)
    return tuple(rate * 16 // output_stride for rate in (6, 12, 18))


def _deeplabv3(parts: Parts, *, aspp_rates: Sequence[int] | None = None, aspp_dropout: float = 0.1) -> nn.Module:
    rates = _aspp_rates(parts.output_stride, aspp_rates)
    head = DeepLabHead(parts.channels["out"], parts.num_classes, rates, aspp_dropout)
    return DeepLabV3(parts.body, head, parts.aux_classifier)


def _deeplabv3plus(
    parts: Parts,
    *,
    aspp_rates: Sequence[int] | None = None,
    aspp_dropout: float = 0.1,
    separable: bool = False,
    decoder_convs: int = 2,
    decoder_concat: str = "aspp_first",
    separable_depthwise_bn: bool = True,
) -> nn.Module:
    rates = _aspp_rates(parts.output_stride, aspp_rates)
    head = DeepLabV3PlusHead(
        parts.channels["out"], parts.channels["low"], parts.num_classes, rates, separable, aspp_dropout,
        decoder_convs, decoder_concat, separable_depthwise_bn,
    )
    return DeepLabV3Plus(parts.body, head, parts.aux_classifier)


@dataclass(frozen=True)
class ArchSpec:
    build: Callable[..., nn.Module]  # (Parts, **options) -> model
    backbones: tuple[str, ...]
    default_backbone: str
    default_output_stride: int
    multi_grid: bool = False  # apply the backbone's default multi-grid unless told otherwise


_V3_BACKBONES = ("resnet18", "resnet50", "resnet101", "xception65", "mobilenetv2")

ARCHS: dict[str, ArchSpec] = {
    "deeplabv1": ArchSpec(_deeplabv1, ("vgg16",), "vgg16", 8),
    "deeplabv2": ArchSpec(_deeplabv2, ("resnet101", "resnet50", "resnet18", "vgg16"), "resnet101", 8),
    "deeplabv3": ArchSpec(_deeplabv3, _V3_BACKBONES, "resnet101", 16, multi_grid=True),
    "deeplabv3plus": ArchSpec(_deeplabv3plus, _V3_BACKBONES, "resnet101", 16, multi_grid=True),
}


def choose(registry: dict[str, Any], name: str, what: str) -> Any:
    """registry[name], or a ValueError listing the valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; choose from: {', '.join(map(str, registry))}") from None


def _options(builder: Callable[..., Any]) -> dict[str, Any]:
    """A builder's keyword-only parameters and their defaults: the options it accepts."""
    return {
        name: param.default
        for name, param in inspect.signature(builder).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_model_arguments(arch: str, backbone: str | None = None, output_stride: int | None = None,
                          aux: bool = False, **opts: Any) -> None:
    """Raises the ValueError `build_model` would raise for these arguments, without building
    anything (configs are checked when loaded, before a cluster starts)."""
    _resolved(arch, backbone, output_stride, aux, opts)


def _resolved(arch: str, backbone: str | None, output_stride: int | None, aux: bool,
              opts: dict[str, Any]) -> tuple[ArchSpec, str, int, dict[str, Any], dict[str, Any]]:
    """(arch spec, backbone name, output stride, backbone kwargs, head kwargs) with the defaults
    filled in; a ValueError listing the valid choices for anything unknown or unsupported."""
    arch_spec: ArchSpec = choose(ARCHS, arch, "arch")
    backbone = arch_spec.default_backbone if backbone is None else backbone
    if backbone not in arch_spec.backbones:
        raise ValueError(f"unknown or unsupported backbone {backbone!r} for {arch}; choose from: "
                         f"{', '.join(arch_spec.backbones)}")
    backbone_spec = BACKBONES[backbone]
    output_stride = arch_spec.default_output_stride if output_stride is None else output_stride
    if output_stride not in backbone_spec.output_strides:
        raise ValueError(f"output_stride {output_stride} is not available for {arch} with {backbone}; choose from: "
                         f"{', '.join(map(str, backbone_spec.output_strides))}")
    if aux and not backbone_spec.aux:
        with_aux = [name for name in arch_spec.backbones if BACKBONES[name].aux]
        raise ValueError(f"aux=True needs a backbone with layer3 features; for {arch} choose from: "
                         f"{', '.join(with_aux) or 'none (use aux=False)'}")

    backbone_options = _options(backbone_spec.build)
    if arch_spec.multi_grid and backbone_spec.multi_grid is not None:
        backbone_options["multi_grid"] = backbone_spec.multi_grid
    head_options = _options(arch_spec.build)
    unknown = set(opts) - set(backbone_options) - set(head_options)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for {arch} with {backbone}; choose from: "
                         f"{', '.join(sorted({**backbone_options, **head_options})) or 'none'}")
    backbone_kwargs = {name: opts.get(name, default) for name, default in backbone_options.items()}
    head_kwargs = {name: opts.get(name, default) for name, default in head_options.items()}
    return arch_spec, backbone, output_stride, backbone_kwargs, head_kwargs


def build_model(
    arch: str,
    backbone: str | None = None,
    num_classes: int = 21,
    output_stride: int | None = None,
    pretrained: str | None = None,
    aux: bool = False,
    input_mean: Sequence[float] = IMAGENET_MEAN,
    input_std: Sequence[float] = IMAGENET_STD,
    **opts: Any,
) -> nn.Module:
    """Build a DeepLab model; see the module docstring and docs/models.md for the options.

    `pretrained` (a local path, an fsspec URI, or "imagenet" for torchvision's ImageNet weights)
    loads into the backbone by name. It is left out of `model.config`: a rebuilt model gets its
    weights from its checkpoint, not from where its backbone once came from.
    `input_mean` / `input_std` (RGB, for inputs scaled to [0, 1]) are recorded in `model.config`
    for whoever feeds the model; the network itself never reads them.
    """
    arch_spec, backbone, output_stride, backbone_kwargs, head_kwargs = _resolved(
        arch, backbone, output_stride, aux, opts)
    backbone_spec = BACKBONES[backbone]
    body, channels = backbone_spec.build(output_stride, **backbone_kwargs)
    aux_classifier = FCNHead(channels["aux"], num_classes) if aux else None
    parts = Parts(backbone, body, channels, num_classes, output_stride, aux_classifier)
    model = arch_spec.build(parts, **head_kwargs)
    if pretrained is not None:
        load_backbone_weights(model.backbone, pretrained, imagenet_weights=backbone_spec.imagenet_weights)
    # The JSON round trip turns tuples into lists and fails early on anything not serialisable.
    model.config = json.loads(json.dumps({
        "arch": arch, "backbone": backbone, "num_classes": num_classes, "output_stride": output_stride,
        "aux": aux, **backbone_kwargs, **head_kwargs,
        "input_mean": [float(m) for m in input_mean], "input_std": [float(s) for s in input_std],
    }))
    return model


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, everything else); the head usually trains at 10x the LR."""
    backbone = list(model.backbone.parameters())
    in_backbone = {id(p) for p in backbone}
    return backbone, [p for p in model.parameters() if id(p) not in in_backbone]
