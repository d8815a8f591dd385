"""DeepLabv3+ head: the v3 ASPP encoder output refined by a decoder on stride-4 features."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .aspp import ASPP, SeparableConv2d, conv_bn_relu, resize


class Decoder(nn.Module):
    """Low-level features -> 1x1 to 48 ch; concat with the upsampled encoder output; two 3x3
    256-ch convs (BN + ReLU; separable with `separable=True`); 1x1 to classes."""

    def __init__(
        self,
        low_channels: int,
        num_classes: int,
        in_channels: int = 256,
        low_project_channels: int = 48,
        channels: int = 256,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.project_low = nn.Sequential(*conv_bn_relu(low_channels, low_project_channels))
        fuse_in = in_channels + low_project_channels
        if separable:
            self.fuse = nn.Sequential(SeparableConv2d(fuse_in, channels), SeparableConv2d(channels, channels))
        else:
            self.fuse = nn.Sequential(*conv_bn_relu(fuse_in, channels, 3), *conv_bn_relu(channels, channels, 3))
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        low = self.project_low(low)
        # "4x upsampling" in the paper; resizing to the low-level map's size also covers odd inputs.
        x = resize(x, low.shape[-2:])
        return self.classify(self.fuse(torch.cat([x, low], dim=1)))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the backbone output, then the decoder with the stride-4 features."""

    def __init__(
        self,
        in_channels: int,
        low_channels: int,
        num_classes: int,
        atrous_rates: Sequence[int],
        separable: bool = False,
        aspp_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, atrous_rates, separable=separable, dropout=aspp_dropout)
        self.decoder = Decoder(low_channels, num_classes, separable=separable)

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        return self.decoder(self.aspp(x), low)
