"""Aligned Xception-65, DeepLabv3+'s backbone (no torchvision equivalent, so no ImageNet weights).

Changes from Xception (DeepLabv3+ paper, sec. 3.2): 16 middle-flow units instead of 8; every max
pool replaced by a stride-2 separable conv, so atrous rates can replace strides; BN + ReLU after
every 3x3 depthwise conv. Units are pre-activation (ReLU before each separable conv, as in the TF
reference) except the exit flow's last three separable convs, which end in BN + ReLU.

Stride -> dilation (TF `stack_blocks_dense` semantics): once the output stride is reached, a
unit that would stride runs at stride 1 with the current rate and later units use the doubled one.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from .ops import SeparableConv2d

# Per output stride: stride of entry block 3, rate of the middle flow, of the exit block, of the
# exit separable convs.
_SCHEDULES = {16: (2, 1, 1, 2), 8: (1, 2, 2, 4)}


class XceptionBlock(nn.Module):
    """Three (ReLU -> separable conv) units, the last one strided, plus a shortcut: identity when
    shapes match, else a strided 1x1 conv + BN."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        stride: int = 1,
        dilation: int = 1,
        start_with_relu: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i, out_channels in enumerate(channels):
            if i > 0 or start_with_relu:
                layers.append(nn.ReLU())
            unit_stride = stride if i == len(channels) - 1 else 1
            layers.append(SeparableConv2d(previous, out_channels, unit_stride, dilation, relu=False))
            previous = out_channels
        self.residual = nn.Sequential(*layers)
        if stride == 1 and in_channels == previous:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, previous, 1, stride=stride, bias=False), nn.BatchNorm2d(previous)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


class Xception65(nn.Module):
    """Returns {"low": stride-4 features (128 ch), "out": last features (2048 ch)}."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        block3_stride, middle_rate, exit_block_rate, exit_rate = _SCHEDULES[output_stride]
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        # Entry flow. Block 1's input is already activated by the stem.
        self.block1 = XceptionBlock(64, (128,) * 3, stride=2, start_with_relu=False)
        self.block2 = XceptionBlock(128, (256,) * 3, stride=2)
        self.block3 = XceptionBlock(256, (728,) * 3, stride=block3_stride)
        self.middle_flow = nn.Sequential(*[XceptionBlock(728, (728,) * 3, dilation=middle_rate) for _ in range(16)])
        # Exit flow: its stride-2 block always runs at stride 1 (output stride <= 16).
        self.exit_block = XceptionBlock(728, (728, 1024, 1024), dilation=exit_block_rate)
        self.exit_convs = nn.Sequential(
            SeparableConv2d(1024, 1536, dilation=exit_rate),
            SeparableConv2d(1536, 1536, dilation=exit_rate),
            SeparableConv2d(1536, 2048, dilation=exit_rate),
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low = self.block1(self.stem(x))
        x = self.block3(self.block2(low))
        x = self.exit_convs(self.exit_block(self.middle_flow(x)))
        return {"low": low, "out": x}


def xception65_backbone(output_stride: int) -> tuple[nn.Module, dict[str, int]]:
    """Aligned Xception-65 -> (extractor returning {"low", "out"}, their channels)."""
    return Xception65(output_stride), {"low": 128, "out": 2048}
