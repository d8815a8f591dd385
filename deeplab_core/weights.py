"""Pretrained weights: loading into a backbone by name, and whole models converted from other
programs' checkpoints, each giving the same eval-mode logits as the network it came from.

- `from_torchvision`: torchvision's `deeplabv3_resnet50/101`.
- `from_vainf`: VainF/DeepLabV3Plus-Pytorch DeepLabV3 / V3+ with ResNet-50/101 or MobileNetV2.
- `from_kazuto`: kazuto1011/deeplab-pytorch's DeepLabV2 ResNet-101 (the converted Caffe model),
  MSC included; its BGR 0-255 input is folded into conv1 and `model.config["input_mean"/"input_std"]`.

A converter never synthesises layers to paper over a difference: what our network cannot compute
exactly is refused with the reason. Sources are a local path, any fsspec URI or an already-loaded
mapping; files are read with `torch.load(weights_only=True)`. Backbone loading by name
(`load_backbone_weights`, `load_matching`, ...) lives in `deeplab_core.loading`, re-exported here.
"""

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .loading import (  # noqa: F401 - re-exported: the public home of these names
    NOT_SUPPORTED,
    Checkpoint,
    LoadReport,
    as_checkpoint,
    describe,
    identify,
    imagenet_state_dict,
    key_differences,
    load_backbone_weights,
    load_matching,
    read_checkpoint,
    read_state_dict,
    tensors,
    unknown_checkpoint_error,
)
from .models import build_model

# Our deeplabv3 in torchvision's configuration: the module names already match torchvision's,
# so converting a checkpoint is choosing these options and loading by name.
TORCHVISION_DEEPLABV3 = {"output_stride": 8, "multi_grid": None, "aspp_rates": (12, 24, 36), "aspp_dropout": 0.5}


def _origin(checkpoint: Checkpoint) -> str:
    return "the given mapping" if isinstance(checkpoint, Mapping) else str(checkpoint)


def _build(*args: Any, **kwargs: Any) -> nn.Module:
    """build_model without allocating or initialising weights that the checkpoint replaces."""
    with torch.device("meta"):
        return build_model(*args, **kwargs)


def _load_exact(model: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> nn.Module:
    """Every tensor by name and shape into a model from `_build`, or a ValueError summarising the
    difference. Files without BatchNorm's `num_batches_tracked` counters get zeros (unused in eval)."""
    own = model.state_dict()
    counters = {k: torch.zeros((), dtype=torch.long) for k in own if k.endswith("num_batches_tracked")}
    state = {**counters, **state_dict}
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        raise ValueError(f"not {what}: {key_differences(own, state)}")
    # Copies, so the model never shares memory with the caller's tensors (e.g. a live model's).
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor outside the state_dict
        raise RuntimeError(f"{type(model).__name__} has tensors that no state_dict sets; build it on a real device")
    return model


def _count_blocks(keys: set[str], layer: str) -> int:
    """Number of residual blocks `layer.N.` among `keys`."""
    pattern = re.compile(re.escape(layer) + r"\.(\d+)\.")
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


_RESNET_BY_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101"}


# --------------------------------------------------------------------------- torchvision


def _torchvision_variant(keys: set[str]) -> str:
    """torchvision's model builder name for a segmentation state_dict, e.g. 'deeplabv3_resnet50'."""
    if "classifier.0.convs.0.0.weight" in keys:
        head = "deeplabv3"
    elif any(k.startswith("classifier.cbr.") for k in keys):
        head = "lraspp"
    elif "classifier.0.weight" in keys:
        head = "fcn"
    else:
        head = "unknown head"
    if "backbone.layer3.0.conv1.weight" in keys:
        blocks = _count_blocks(keys, "backbone.layer3")
        backbone = _RESNET_BY_LAYER3_BLOCKS.get(blocks, f"resnet with {blocks} layer3 blocks")
    elif "backbone.0.0.weight" in keys:
        backbone = "mobilenet_v3_large"
    else:
        backbone = "unknown backbone"
    return f"{head}_{backbone}"


SUPPORTED_TORCHVISION = ("deeplabv3_resnet50", "deeplabv3_resnet101")


def from_torchvision(checkpoint: Checkpoint, backbone: str | None = None, num_classes: int = 21) -> nn.Module:
    """Our deeplabv3 (output stride 8, rates 12/24/36, no multi-grid) from a torchvision
    `deeplabv3_resnet50/101` state_dict (or its path / URI); the aux head is kept if present.

    `backbone` (resnet50 / resnet101) is read from the file when None. Every tensor must match by
    name and shape: anything else is not such a checkpoint.
    """
    state_dict = as_checkpoint(checkpoint)
    keys = set(tensors(state_dict))
    variant = _torchvision_variant(keys)
    if variant.startswith("unknown head_unknown backbone"):
        raise unknown_checkpoint_error(state_dict, _origin(checkpoint), "a torchvision segmentation state_dict")
    if variant not in SUPPORTED_TORCHVISION:
        raise ValueError(
            f"torchvision's {variant} is not supported: only {' and '.join(SUPPORTED_TORCHVISION)} convert (their "
            f"ResNet backbone and ASPP head are ours); MobileNetV3, FCN and LR-ASPP models have no counterpart here. "
            f"Found {describe(state_dict)}"
        )
    found = variant.removeprefix("deeplabv3_")
    backbone = found if backbone is None else backbone
    what = f"a torchvision deeplabv3_{backbone} state_dict with {num_classes} classes"
    if backbone != found:
        raise ValueError(f"not {what}: the file holds deeplabv3_{found}")
    aux = any(key.startswith("aux_classifier.") for key in keys)
    model = _build("deeplabv3", backbone, num_classes, aux=aux, **TORCHVISION_DEEPLABV3)
    return _load_exact(model, state_dict, what)


# --------------------------------------------------------------------------- VainF


# Our options that make our network VainF's (see docs/models.md, "Peers' checkpoints").
_VAINF_BACKBONE_OPTIONS: dict[str, dict[str, Any]] = {
    # torchvision's replace_stride_with_dilation, no multi-grid.
    "resnet50": {"multi_grid": None},
    "resnet101": {"multi_grid": None},
    # Unpadded stem; each inverted residual F.pad's its input before the 1x1 expansion.
    "mobilenetv2": {"stem_padding": 0, "block_padding": "input"},
}
_VAINF_HEAD_OPTIONS: dict[str, dict[str, Any]] = {
    "deeplabv3": {},
    # One 3x3 conv after concatenating [low-level 48, ASPP 256].
    "deeplabv3plus": {"decoder_convs": 1, "decoder_concat": "low_first"},
}
# VainF key prefix -> ours, per architecture (first match wins).
_VAINF_HEAD_KEYS: dict[str, list[tuple[str, str]]] = {
    "deeplabv3": [("classifier.classifier.", "classifier.")],
    "deeplabv3plus": [
        ("classifier.project.", "classifier.decoder.project_low."),
        ("classifier.classifier.0.", "classifier.decoder.fuse.0."),
        ("classifier.classifier.1.", "classifier.decoder.fuse.1."),
        ("classifier.classifier.3.", "classifier.decoder.classify."),
    ],
}
# With --separable_conv, VainF's 3x3 convs in the v3+ head become `body` = (depthwise, pointwise).
_VAINF_SEPARABLE_KEYS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^classifier\.aspp\.convs\.([123])\.0\.body\.0\."), r"classifier.aspp.convs.\1.depthwise."),
    (re.compile(r"^classifier\.aspp\.convs\.([123])\.0\.body\.1\."), r"classifier.aspp.convs.\1.pointwise."),
    (re.compile(r"^classifier\.aspp\.convs\.([123])\.1\."), r"classifier.aspp.convs.\1.pointwise_bn."),
    (re.compile(r"^classifier\.classifier\.0\.body\.0\."), "classifier.decoder.fuse.0.depthwise."),
    (re.compile(r"^classifier\.classifier\.0\.body\.1\."), "classifier.decoder.fuse.0.pointwise."),
    (re.compile(r"^classifier\.classifier\.1\."), "classifier.decoder.fuse.0.pointwise_bn."),
]
# Our separable conv as VainF's: depthwise -> pointwise -> BN -> ReLU (no BN + ReLU in between).
_VAINF_SEPARABLE_OPTIONS = {"separable": True, "separable_depthwise_bn": False}
_VAINF_CLASSIFIER = {"deeplabv3": "classifier.classifier.4.weight", "deeplabv3plus": "classifier.classifier.3.weight"}
# VainF splits MobileNetV2's features by slicing the nn.Sequential: features[0:4] and
# features[4:-1] (the last 1x1 conv to 1280 channels dropped). A slice keeps its children's names,
# so the file's indices are torchvision's (and ours): low 0-3, high 4-17.
_VAINF_MOBILENET = re.compile(r"^backbone\.(low|high)_level_features\.(\d+)\.")
_VAINF_MOBILENET_BLOCKS = {"low": set(range(0, 4)), "high": set(range(4, 18))}


# What VainF's other backbones are, for the refusal.
_VAINF_UNSUPPORTED = {
    "xception": "Cadene's original Xception, block1-12 and conv1-4; ours is the aligned Xception-65",
    "hrnetv2": "no HRNet backbone here",
}


def _vainf_arch(keys: set[str]) -> str | None:
    if "classifier.aspp.project.0.weight" in keys:
        return "deeplabv3plus"
    if "classifier.classifier.0.project.0.weight" in keys:
        return "deeplabv3"
    return None


def _vainf_backbone(keys: set[str]) -> str:
    if any(k.startswith("backbone.low_level_features.") for k in keys):
        return "mobilenetv2"
    if "backbone.layer3.0.conv1.weight" in keys:
        blocks = _count_blocks(keys, "backbone.layer3")
        return _RESNET_BY_LAYER3_BLOCKS.get(blocks, f"a ResNet with {blocks} layer3 blocks")
    if any(k.startswith("backbone.stage4.") for k in keys):
        return "hrnetv2"
    if any(k.startswith("backbone.block1.") for k in keys):
        return "xception"
    return "an unknown backbone"


def _span(indices: set[int]) -> str:
    """'4-17' for a contiguous run, else the indices listed."""
    if not indices:
        return "none"
    low, high = min(indices), max(indices)
    return f"{low}-{high}" if high - low + 1 == len(indices) else ", ".join(map(str, sorted(indices)))


def _check_vainf_mobilenet(keys: set[str], origin: str) -> None:
    """Refuse, in one line, a MobileNetV2 split other than VainF's (e.g. renumbered slices, which
    would otherwise map two blocks onto one of ours)."""
    found: dict[str, set[int]] = {"low": set(), "high": set()}
    for key in keys:
        if match := _VAINF_MOBILENET.match(key):
            found[match.group(1)].add(int(match.group(2)))
    if found != _VAINF_MOBILENET_BLOCKS:
        raise ValueError(
            f"{origin}: not VainF's MobileNetV2 layout: backbone.low_level_features / high_level_features hold blocks "
            f"{_span(found['low'])} / {_span(found['high'])}, VainF's modeling.py saves 0-3 / 4-17 (slices of "
            f"features keep their indices; the last 1x1 conv is dropped)"
        )


def _vainf_key(key: str, arch: str, separable: bool) -> str:
    if match := _VAINF_MOBILENET.match(key):
        return f"backbone.features.{match.group(2)}." + key[match.end():]
    for pattern, replacement in _VAINF_SEPARABLE_KEYS if separable else ():
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    for old, new in _VAINF_HEAD_KEYS[arch]:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def from_vainf(
    checkpoint: Checkpoint, arch: str, backbone: str, num_classes: int, output_stride: int = 16
) -> nn.Module:
    """Our model computing a VainF/DeepLabV3Plus-Pytorch network's logits, from its checkpoint
    (`{"model_state", "optimizer_state", ...}`) or bare `model_state`.

    arch: "deeplabv3" | "deeplabv3plus"; backbone: "resnet50" | "resnet101" | "mobilenetv2";
    `output_stride` (8 or 16) is the one the model was trained / is to be run at: the weights are
    the same at both, so it cannot be read from the file. `--separable_conv` v3+ models convert
    with `separable=True, separable_depthwise_bn=False`. VainF's Xception and HRNet backbones are
    refused.
    """
    obj = as_checkpoint(checkpoint)
    state = obj["model_state"] if isinstance(obj.get("model_state"), Mapping) else obj
    state = tensors(state)
    keys = set(state)
    found_arch = _vainf_arch(keys)
    origin = _origin(checkpoint)
    if found_arch is None:
        raise unknown_checkpoint_error(obj, origin, "a VainF/DeepLabV3Plus-Pytorch DeepLabV3 / V3+ checkpoint")
    separable = any(k.startswith("classifier.") and ".body.0." in k for k in keys)
    found_backbone = _vainf_backbone(keys)
    if found_backbone not in _VAINF_BACKBONE_OPTIONS:
        why = _VAINF_UNSUPPORTED.get(found_backbone, "no counterpart here")
        raise ValueError(
            f"{origin}: VainF's {found_arch} with {found_backbone} is not supported ({why}); supported backbones: "
            f"{', '.join(_VAINF_BACKBONE_OPTIONS)}"
        )
    if separable and found_arch == "deeplabv3":
        raise ValueError(
            f"{origin}: VainF's deeplabv3 with separable convs in its head (convert_to_separable_conv on a v3 model; "
            f"VainF's main.py applies it to v3+ only) is not supported: our deeplabv3 head has no separable option"
        )
    found_classes = state[_VAINF_CLASSIFIER[found_arch]].shape[0]
    if (arch, backbone, num_classes) != (found_arch, found_backbone, found_classes):
        raise ValueError(
            f"{origin} holds VainF's {found_arch} with {found_backbone} and {found_classes} classes, not {arch} with "
            f"{backbone} and {num_classes} classes"
        )
    if backbone == "mobilenetv2":
        _check_vainf_mobilenet(keys, origin)
    model = _build(
        arch, backbone, num_classes, output_stride=output_stride,
        **_VAINF_BACKBONE_OPTIONS[backbone], **_VAINF_HEAD_OPTIONS[arch],
        **(_VAINF_SEPARABLE_OPTIONS if separable else {}),
    )
    ours = {_vainf_key(k, arch, separable): v for k, v in state.items()}
    return _load_exact(model, ours, f"a VainF {arch} {backbone} state_dict")


# --------------------------------------------------------------------------- kazuto1011

# Caffe's mean pixel, BGR, on 0-255 inputs. kazuto's network takes bgr * 255 - KAZUTO_MEAN_BGR;
# ours takes (rgb / 255 - mean) / std: with mean = mean_rgb / 255 and std = 1 / 255 that is
# rgb * 255 - mean_rgb, and the channel order is folded into conv1 (its input channels reversed).
KAZUTO_MEAN_BGR = (104.008, 116.669, 122.675)
KAZUTO_INPUT = {
    "input_mean": tuple(m / 255 for m in reversed(KAZUTO_MEAN_BGR)),
    "input_std": (1 / 255,) * 3,
}
# DeepLab v2 as the Caffe model (and kazuto's port) computes it: MSRA ResNet, ASPP-L, MSC with
# score-map max fusion of a `scale_factor` pyramid.
KAZUTO_DEEPLABV2 = {
    "output_stride": 8,
    "aspp": "L",
    "stride_in": "1x1",
    "dilate_first_block": True,
    "maxpool_ceil_mode": True,
    "msc_fusion": "score_map",
    "msc_resize": "scale_factor",
    **KAZUTO_INPUT,
}
KAZUTO_MSC_SCALES = (1.0, 0.75, 0.5)

_KAZUTO_UNITS = {
    ("reduce", "conv"): "conv1", ("reduce", "bn"): "bn1",
    ("conv3x3", "conv"): "conv2", ("conv3x3", "bn"): "bn2",
    ("increase", "conv"): "conv3", ("increase", "bn"): "bn3",
    ("shortcut", "conv"): "downsample.0", ("shortcut", "bn"): "downsample.1",
}
_KAZUTO_BLOCK = re.compile(r"^layer(\d)\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(\w+)$")
_KAZUTO_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"^layer1\.conv1\.conv\.(\w+)$"), lambda m: f"backbone.conv1.{m[1]}"),
    (re.compile(r"^layer1\.conv1\.bn\.(\w+)$"), lambda m: f"backbone.bn1.{m[1]}"),
    # kazuto's layer1 is the stem, so its layer k is torchvision's layer k - 1.
    (_KAZUTO_BLOCK, lambda m: f"backbone.layer{int(m[1]) - 1}.{int(m[2]) - 1}.{_KAZUTO_UNITS[m[3], m[4]]}.{m[5]}"),
    (re.compile(r"^aspp\.c(\d)\.(weight|bias)$"), lambda m: f"classifier.branches.{m[1]}.{m[2]}"),
]


def _kazuto_key(key: str) -> str | None:
    for pattern, rename in _KAZUTO_RULES:
        if match := pattern.match(key):
            return rename(match)
    return None


def from_kazuto(checkpoint: Checkpoint, num_classes: int) -> nn.Module:
    """Our deeplabv2 computing kazuto1011/deeplab-pytorch's DeepLabV2 ResNet-101 logits, from its
    state_dict: `DeepLabV2_ResNet101_MSC` (keys under `base.`; MSC at scales 1, 0.75, 0.5) or the
    bare `DeepLabV2` (no MSC).

    The model takes RGB normalised with `model.config["input_mean"]` / `["input_std"]` (Caffe's
    mean pixel, 0-255 scale); conv1 holds kazuto's weights with the input channels reversed.
    """
    obj = as_checkpoint(checkpoint)
    state = tensors(obj)
    found = identify(obj)
    if found is not None and found[1].startswith(NOT_SUPPORTED):
        raise ValueError(f"{_origin(checkpoint)}: {found[0]} is {found[1]}")
    msc = any(k.startswith("base.") for k in state)
    bare = {k.removeprefix("base."): v for k, v in state.items()}
    if "layer1.conv1.conv.weight" not in bare or "aspp.c0.weight" not in bare:
        raise unknown_checkpoint_error(obj, _origin(checkpoint), "a kazuto1011/deeplab-pytorch DeepLabV2 state_dict")
    unknown = [k for k in bare if _kazuto_key(k) is None]
    if unknown:
        raise ValueError(f"{_origin(checkpoint)}: not a kazuto DeepLabV2 ResNet: unexpected tensors {unknown[:5]}")
    ours = {_kazuto_key(k): v for k, v in bare.items()}
    ours["backbone.conv1.weight"] = ours["backbone.conv1.weight"].flip(1)  # BGR -> RGB input channels
    blocks = _count_blocks(set(ours), "backbone.layer3")
    backbone = _RESNET_BY_LAYER3_BLOCKS.get(blocks)
    found_classes = ours["classifier.branches.0.weight"].shape[0]
    if backbone is None or found_classes != num_classes:
        raise ValueError(
            f"{_origin(checkpoint)} holds a kazuto DeepLabV2 with {blocks} blocks in its layer4 (ResNet-101: 23) and "
            f"{found_classes} classes; asked for {num_classes} classes"
        )
    model = _build(
        "deeplabv2", backbone, num_classes, msc_scales=KAZUTO_MSC_SCALES if msc else None, **KAZUTO_DEEPLABV2
    )
    return _load_exact(model, ours, f"a kazuto DeepLabV2 {backbone} state_dict")
