"""torchvision's ResNet v1.5 as a dilated DeepLab feature extractor.

The network is torchvision's own (`replace_stride_with_dilation` handles the stride-to-dilation
swap and `previous_dilation` for the first block of a dilated stage), so the extractor's
state_dict keys are exactly torchvision's (`conv1`, `bn1`, `layer1..4`; no `fc`) and ImageNet
weights load by name.

Options for the original (MSRA/Caffe) ResNet that DeepLab v2 was trained with, which has the same
tensors: `stride_in="1x1"` (a strided stage's first block strides in its 1x1 conv, ResNet v1;
torchvision v1.5 strides in the 3x3), `dilate_first_block=True` (the first block of a dilated
stage already runs at the stage's rate) and `maxpool_ceil_mode=True` (Caffe pooling rounds up).
"""

from collections.abc import Sequence
from functools import partial

from torch import nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter

from .ops import set_dilation

# "low": stride 4 (v3+ decoder), "aux": layer3 (FCN auxiliary head), "out": the last stage.
RETURN_LAYERS = {"layer1": "low", "layer3": "aux", "layer4": "out"}

# Stages turned from stride 2 into dilation, for (layer2, layer3, layer4).
_DILATED_STAGES = {16: [False, False, True], 8: [False, True, True]}


class _DilatedBasicBlock(resnet.BasicBlock):
    """torchvision's BasicBlock refuses dilation > 1; same parameters, atrous 3x3 convs."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        set_dilation(self, dilation)


_CONSTRUCTORS = {
    # resnet18() hard-codes BasicBlock; the same ResNet class with the dilation-capable block.
    "resnet18": partial(resnet.ResNet, _DilatedBasicBlock, [2, 2, 2, 2]),
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}


def apply_multi_grid(layer4: nn.Sequential, base_rate: int, multi_grid: Sequence[int]) -> None:
    """DeepLabv3 multi-grid: block i of the last stage gets dilation base_rate * multi_grid[i]."""
    if len(multi_grid) != len(layer4):
        raise ValueError(f"multi_grid needs one rate per block of layer4 ({len(layer4)}), got {tuple(multi_grid)}")
    for block, unit_rate in zip(layer4, multi_grid):
        set_dilation(block, base_rate * unit_rate)


STRIDE_IN = ("3x3", "1x1")


def _stride_in_1x1(net: resnet.ResNet) -> None:
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        if block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def resnet_backbone(
    name: str,
    output_stride: int,
    *,
    multi_grid: Sequence[int] | None = None,
    stride_in: str = "3x3",
    dilate_first_block: bool = False,
    maxpool_ceil_mode: bool = False,
) -> tuple[nn.Module, dict[str, int]]:
    """Dilated torchvision ResNet -> (extractor returning {"low", "aux", "out"}, their channels)."""
    if stride_in not in STRIDE_IN:
        raise ValueError(f"unknown stride_in {stride_in!r}; choose from: {', '.join(STRIDE_IN)}")
    net = _CONSTRUCTORS[name](replace_stride_with_dilation=_DILATED_STAGES[output_stride])
    if stride_in == "1x1":
        if not isinstance(net.layer2[0], resnet.Bottleneck):
            raise ValueError(f"stride_in='1x1' needs bottleneck blocks (resnet50/101); {name} has no 1x1 conv first")
        _stride_in_1x1(net)
    if dilate_first_block:
        for layer, dilated in zip((net.layer2, net.layer3, net.layer4), _DILATED_STAGES[output_stride]):
            if dilated:  # the rate the rest of the stage runs at
                set_dilation(layer[0], layer[-1].conv2.dilation[0])
    net.maxpool.ceil_mode = maxpool_ceil_mode
    if multi_grid is not None:
        apply_multi_grid(net.layer4, 32 // output_stride, multi_grid)
    out_channels = net.fc.in_features
    channels = {"low": out_channels // 8, "aux": out_channels // 2, "out": out_channels}
    return IntermediateLayerGetter(net, RETURN_LAYERS), channels
