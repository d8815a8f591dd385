"""torchvision's MobileNetV2 as a dilated DeepLabv3+ feature extractor.

Uses `features.0..17` (the 320-channel last inverted-residual block, as the DeepLab paper and
VainF do; torchvision's final 1x1 to 1280 channels is dropped). Keys stay torchvision's
`features.N.*`. For output stride 16/8 the strided blocks lose their stride and the blocks after
them become atrous, the first block of a dilated stage keeping the previous rate (like
torchvision's ResNet `previous_dilation`).

Padding options (same tensors, different borders): torchvision pads inside each 3x3 conv
(`stem_padding=1`, `block_padding="depthwise"`). `block_padding="input"` zero-pads each inverted
residual's *input*, before its 1x1 expansion, and leaves the depthwise conv unpadded: the border
then goes through expansion, BN and ReLU6, so it is no longer zero when the depthwise conv sees
it (the scheme of TF-style "fixed padding" ports such as VainF's, whose stem is unpadded:
`stem_padding=0`).
"""

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual

from .ops import set_dilation
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


class InputPaddedInvertedResidual(nn.Module):
    """A torchvision inverted residual (same `conv` modules and keys) that zero-pads its input by
    the depthwise conv's padding and runs the depthwise conv unpadded."""

    def __init__(self, block: InvertedResidual) -> None:
        super().__init__()
        self.conv = block.conv
        self.use_res_connect = block.use_res_connect
        self.out_channels = block.out_channels
        depthwise = next(m for m in block.conv.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        self.padding = depthwise.padding[0]
        depthwise.padding = (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(F.pad(x, [self.padding] * 4))
        return x + out if self.use_res_connect else out


BLOCK_PADDING = ("depthwise", "input")


def mobilenetv2_backbone(
    output_stride: int, *, width_mult: float = 1.0, stem_padding: int = 1, block_padding: str = "depthwise"
) -> tuple[nn.Module, dict[str, int]]:
    """Dilated MobileNetV2 -> (extractor returning {"low", "out"}, their channels)."""
    if block_padding not in BLOCK_PADDING:
        raise ValueError(f"unknown block_padding {block_padding!r}; choose from: {', '.join(BLOCK_PADDING)}")
    net = mobilenet_v2(width_mult=width_mult)
    for start, end, rate, first_rate in _DILATED_STAGES[output_stride]:
        _dilate_stage(net.features[start:end], rate, first_rate)
    net.features[0][0].padding = (stem_padding, stem_padding)
    if block_padding == "input":
        for i in range(1, _OUT + 1):
            net.features[i] = InputPaddedInvertedResidual(net.features[i])
    channels = {"low": net.features[_LOW].out_channels, "out": net.features[_OUT].out_channels}
    return TorchvisionFeatures(net.features, {_LOW: "low", _OUT: "out"}), channels
