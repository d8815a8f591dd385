"""The DeepLab heads' atrous blocks (the shared primitives are ops.py).

- `ASPP`: DeepLabv3's pyramid, laid out exactly like torchvision's (`convs.0..4`, `project`) so
  torchvision's deeplabv3 checkpoints load by name.
- `DeepLabHead`: ASPP -> 3x3 conv -> 1x1 classifier (torchvision's `DeepLabHead` layout).
- `LargeFOV` and `ASPPV2`: DeepLab v1's fc6-fc7-fc8 head and v2's summed atrous branches.
"""

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .ops import SeparableConv2d, conv_bn_relu, resize


class ASPPConv(nn.Sequential):
    """One atrous 3x3 branch: conv -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(*conv_bn_relu(in_channels, out_channels, 3, dilation))


class ASPPPooling(nn.Sequential):
    """Image-level features: global average pool -> 1x1 conv -> BN -> ReLU -> upsample."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return resize(x, size)


class ASPP(nn.Module):
    """DeepLabv3 ASPP: 1x1 + one 3x3 branch per rate + image pooling, concat -> 1x1 projection.

    Module names and order match torchvision's `ASPP`; `dropout` is 0.5 in torchvision and 0.1
    in the TF/VainF recipes.
    """

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int],
        out_channels: int = 256,
        separable: bool = False,
        dropout: float = 0.1,
        separable_depthwise_bn: bool = True,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(*conv_bn_relu(in_channels, out_channels))]
        for rate in atrous_rates:
            branches.append(
                SeparableConv2d(in_channels, out_channels, dilation=rate, depthwise_bn=separable_depthwise_bn)
                if separable else ASPPConv(in_channels, out_channels, dilation=rate)
            )
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            *conv_bn_relu(len(branches) * out_channels, out_channels), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """DeepLabv3 classifier: ASPP -> 3x3 conv + BN + ReLU -> 1x1 to classes (torchvision layout)."""

    def __init__(
        self, in_channels: int, num_classes: int, atrous_rates: Sequence[int], aspp_dropout: float = 0.1
    ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, dropout=aspp_dropout),
            *conv_bn_relu(256, 256, 3),
            nn.Conv2d(256, num_classes, 1),
        )


class LargeFOV(nn.Sequential):
    """DeepLab-v1 LargeFOV head: fc6 (3x3, 1024 ch, dilation 12) -> fc7 (1x1, 1024) -> fc8 (1x1).

    VGG-16's fully connected layers turned into convs, with dropout 0.5 after fc6 and fc7.
    DeepLab-v2's VGG-16 ASPP uses one such branch per rate.
    """

    def __init__(
        self, in_channels: int, num_classes: int, rate: int = 12, channels: int = 1024, dropout: float = 0.5
    ) -> None:
        super().__init__(
            OrderedDict(
                fc6=nn.Conv2d(in_channels, channels, 3, padding=rate, dilation=rate),
                relu6=nn.ReLU(),
                drop6=nn.Dropout(dropout),
                fc7=nn.Conv2d(channels, channels, 1),
                relu7=nn.ReLU(),
                drop7=nn.Dropout(dropout),
                fc8=nn.Conv2d(channels, num_classes, 1),
            )
        )


class ASPPV2(nn.Module):
    """DeepLab-v2 ASPP: parallel atrous branches, each already at class scores, summed."""

    def __init__(self, branches: Iterable[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)
