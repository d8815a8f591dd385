"""torchvision's MobileNetV2 as a dilated DeepLabv3+ feature extractor.

Uses `features.0..17` (the 320-channel last inverted-residual block, as the DeepLab paper and
VainF do; torchvision's final 1x1 to 1280 channels is dropped). Keys stay torchvision's
`features.N.*`. For output stride 16/8 the strided blocks lose their stride and the blocks after
them become atrous, the first block of a dilated stage keeping the previous rate (like
torchvision's ResNet `previous_dilation`).
"""

from torch import nn
from torchvision.models import mobilenet_v2

from .aspp import set_dilation
from .vgg import TorchvisionFeatures

_LOW, _OUT = 3, 17  # stride-4 block, last block
# (first block, end block, rate, rate of the first block) of each stage to dilate.
_DILATED_STAGES = {16: [(14, 18, 2, 1)], 8: [(7, 14, 2, 1), (14, 18, 4, 2)]}


def _dilate_stage(blocks: nn.Sequential, rate: int, first_rate: int) -> None:
    for conv in blocks[0].modules():
        if isinstance(conv, nn.Conv2d):
            conv.stride = (1, 1)
    set_dilation(blocks[0], first_rate)
    set_dilation(blocks[1:], rate)


def mobilenetv2_backbone(output_stride: int, *, width_mult: float = 1.0) -> tuple[nn.Module, dict[str, int]]:
    """Dilated MobileNetV2 -> (extractor returning {"low", "out"}, their channels)."""
    net = mobilenet_v2(width_mult=width_mult)
    for start, end, rate, first_rate in _DILATED_STAGES[output_stride]:
        _dilate_stage(net.features[start:end], rate, first_rate)
    channels = {"low": net.features[_LOW].out_channels, "out": net.features[_OUT].out_channels}
    return TorchvisionFeatures(net.features, {_LOW: "low", _OUT: "out"}), channels
