"""The DeepLab model classes: a backbone returning named feature maps, a classifier on them, and
an optional auxiliary FCN head, laid out like torchvision's segmentation models
(`backbone`, `classifier`, `aux_classifier`).

`forward(x)` returns logits N x C x H x W at the input size; with an auxiliary head and in training
mode it returns {"out": logits, "aux": aux_logits}.
"""

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .aspp import resize


class DeepLab(nn.Module):
    """Common forward of every version; subclasses differ in their classifier."""

    # build_model's arguments, enough to rebuild the model; plain data that forward never reads.
    config: dict[str, Any]
    __jit_ignored_attributes__ = ["config"]

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.config = {}  # filled in by build_model

    def _classify(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])

    def _single_scale(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        outputs = {"out": resize(self._classify(features), size)}
        if self.aux_classifier is not None and self.training:
            outputs["aux"] = resize(self.aux_classifier(features["aux"]), size)
        return outputs

    def _predict(self, x: Tensor) -> dict[str, Tensor]:
        return self._single_scale(x)

    def forward(self, x: Tensor) -> Union[Tensor, dict[str, Tensor]]:
        outputs = self._predict(x)
        if "aux" in outputs:
            return outputs
        return outputs["out"]


class DeepLabV1(DeepLab):
    """DeepLab-v1 LargeFOV (Chen et al., ICLR 2015): VGG-16 at output stride 8 + `LargeFOV`."""


class DeepLabV2(DeepLab):
    """DeepLab-v2 (Chen et al., TPAMI 2017): ASPP-L/S summed branches, optional MSC.

    MSC runs the network on an input pyramid (`msc_scales`, e.g. (1, 0.75, 0.5)) and fuses the
    logits, each resized to the input size, by pixel-wise max. The fused logits are returned in
    training too (the paper also supervises each scale; the fused output carries the gradient to
    all of them).
    """

    msc_scales: list[float]  # class-level, so TorchScript can type an empty list

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        aux_classifier: Optional[nn.Module] = None,
        msc_scales: Sequence[float] = (),
    ) -> None:
        super().__init__(backbone, classifier, aux_classifier)
        self.msc_scales = [float(scale) for scale in msc_scales]

    def _predict(self, x: Tensor) -> dict[str, Tensor]:
        if len(self.msc_scales) == 0:
            return self._single_scale(x)
        size = x.shape[-2:]
        fused: dict[str, Tensor] = {}
        for scale in self.msc_scales:
            scaled = x if scale == 1.0 else resize(x, [int(size[0] * scale), int(size[1] * scale)])
            for name, logits in self._single_scale(scaled).items():
                logits = resize(logits, size)
                fused[name] = torch.maximum(fused[name], logits) if name in fused else logits
        return fused


class DeepLabV3(DeepLab):
    """DeepLabv3 (Chen et al., 2017): (multi-grid) dilated ResNet + ASPP with image pooling."""


class DeepLabV3Plus(DeepLab):
    """DeepLabv3+ (Chen et al., ECCV 2018): the v3 encoder + a decoder on stride-4 features."""

    def _classify(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"], features["low"])
