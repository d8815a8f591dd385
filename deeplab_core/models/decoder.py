"""DeepLabv3+ head: the v3 ASPP encoder output refined by a decoder on stride-4 features."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .aspp import ASPP
from .ops import SeparableConv2d, conv_bn_relu, resize


DECODER_CONCAT = ("aspp_first", "low_first")


class Decoder(nn.Module):
    """Low-level features -> 1x1 to 48 ch; concat with the upsampled encoder output; `convs` 3x3
    256-ch convs (BN + ReLU; separable with `separable=True`); 1x1 to classes.

    The paper has two 3x3 convs; VainF's port one. `concat` is the channel order of the concat
    ("aspp_first": [ASPP 256, low 48]; "low_first": [low 48, ASPP 256]), i.e. of the first conv's
    input channels.
    """

    def __init__(
        self,
        low_channels: int,
        num_classes: int,
        in_channels: int = 256,
        low_project_channels: int = 48,
        channels: int = 256,
        separable: bool = False,
        convs: int = 2,
        concat: str = "aspp_first",
        separable_depthwise_bn: bool = True,
    ) -> None:
        super().__init__()
        if convs < 1:
            raise ValueError(f"decoder_convs must be at least 1, got {convs}")
        if concat not in DECODER_CONCAT:
            raise ValueError(f"unknown decoder_concat {concat!r}; choose from: {', '.join(DECODER_CONCAT)}")
        self.low_first = concat == "low_first"
        self.project_low = nn.Sequential(*conv_bn_relu(low_channels, low_project_channels))
        widths = [in_channels + low_project_channels] + [channels] * convs
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            if separable:
                layers.append(SeparableConv2d(c_in, c_out, depthwise_bn=separable_depthwise_bn))
            else:
                layers += conv_bn_relu(c_in, c_out, 3)
        self.fuse = nn.Sequential(*layers)
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        low = self.project_low(low)
        # "4x upsampling" in the paper; resizing to the low-level map's size also covers odd inputs.
        x = resize(x, low.shape[-2:])
        return self.classify(self.fuse(torch.cat([low, x] if self.low_first else [x, low], dim=1)))


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
        decoder_convs: int = 2,
        decoder_concat: str = "aspp_first",
        separable_depthwise_bn: bool = True,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(
            in_channels, atrous_rates, separable=separable, dropout=aspp_dropout,
            separable_depthwise_bn=separable_depthwise_bn,
        )
        self.decoder = Decoder(
            low_channels, num_classes, separable=separable, convs=decoder_convs, concat=decoder_concat,
            separable_depthwise_bn=separable_depthwise_bn,
        )

    def forward(self, x: Tensor, low: Tensor) -> Tensor:
        return self.decoder(self.aspp(x), low)
