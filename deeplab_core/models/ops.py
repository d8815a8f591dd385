"""The primitives the backbones, heads and models share (no model file imports another's head):

- `resize`: bilinear, align_corners=False, the one convention used across the project.
- `set_dilation`: turns a stage's 3x3 convs atrous.
- `conv_bn_relu`, `SeparableConv2d`: DeepLabv3+'s atrous depthwise-separable conv (also Xception's unit).
"""

from collections import OrderedDict

from torch import Tensor, nn
from torch.nn import functional as F


def resize(x: Tensor, size: list[int]) -> Tensor:
    """Bilinear resize with align_corners=False, the one convention used across the project."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def set_dilation(module: nn.Module, rate: int) -> None:
    """Make every 3x3 conv inside `module` atrous at `rate`; padding = rate keeps the size."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel_size // 2)
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class SeparableConv2d(nn.Sequential):
    """Atrous separable conv: depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN (-> ReLU).

    DeepLabv3+ adds BN + ReLU after the depthwise conv (MobileNet style); `relu=False` leaves the
    output un-activated, for Xception units whose ReLU comes before the next conv or the sum.
    `depthwise_bn=False` drops that inner BN + ReLU: depthwise -> pointwise -> BN -> ReLU, a plain
    factorised 3x3 conv (VainF's `--separable_conv`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        relu: bool = True,
        depthwise_bn: bool = True,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            depthwise=nn.Conv2d(
                in_channels, in_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                groups=in_channels, bias=False,
            )
        )
        if depthwise_bn:
            layers["depthwise_bn"] = nn.BatchNorm2d(in_channels)
            layers["depthwise_relu"] = nn.ReLU()
        layers["pointwise"] = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        layers["pointwise_bn"] = nn.BatchNorm2d(out_channels)
        if relu:
            layers["pointwise_relu"] = nn.ReLU()
        super().__init__(layers)
