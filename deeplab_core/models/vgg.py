"""VGG-16 as DeepLab-v1/v2's feature extractor (output stride 8).

DeepLab changes to torchvision's `vgg16().features` (the indices, and so the `features.N`
parameter names, stay torchvision's so ImageNet weights load by name):
pools 1-3 become 3x3 stride 2 pad 1, pools 4-5 3x3 stride 1 pad 1, and conv5_x get dilation 2.
"""

from torch import Tensor, nn
from torchvision.models import vgg
from torchvision.models._utils import IntermediateLayerGetter

from .ops import set_dilation

_STRIDED_POOLS = (4, 9, 16)
_UNSTRIDED_POOLS = (23, 30)
_CONV5 = slice(24, 30)


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG-16 `features` with VGG's own init, without building its 120M-parameter
    classifier only to drop it."""
    features = vgg.make_layers(vgg.cfgs["D"])
    for conv in features.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return features


class TorchvisionFeatures(nn.Module):
    """Feature maps from blocks of a torchvision `features` Sequential (VGG, MobileNet), held under
    the name `features` so the state_dict keys stay torchvision's `features.N.*`.

    `return_layers` maps block indices to feature names; blocks after the last one are dropped.
    """

    def __init__(self, features: nn.Sequential, return_layers: dict[int, str]) -> None:
        super().__init__()
        self.features = IntermediateLayerGetter(features, {str(i): name for i, name in return_layers.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.features(x)


def vgg16_backbone(output_stride: int) -> tuple[nn.Module, dict[str, int]]:
    """DeepLab VGG-16 -> (extractor returning {"out"} at stride 8, its channels)."""
    features = _vgg16_features()
    for index in _STRIDED_POOLS:
        features[index] = nn.MaxPool2d(3, stride=2, padding=1)
    for index in _UNSTRIDED_POOLS:
        features[index] = nn.MaxPool2d(3, stride=1, padding=1)
    set_dilation(features[_CONV5], 2)
    return TorchvisionFeatures(features, {len(features) - 1: "out"}), {"out": 512}
