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
from torch.nn import functional as F

from .ops import resize


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

    def _scores(self, x: Tensor) -> dict[str, Tensor]:
        """Score maps at the classifier's resolution (output stride / 4 for v3+)."""
        features = self.backbone(x)
        outputs = {"out": self._classify(features)}
        if self.aux_classifier is not None and self.training:
            outputs["aux"] = self.aux_classifier(features["aux"])
        return outputs

    def _single_scale(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        return {name: resize(scores, size) for name, scores in self._scores(x).items()}

    def _predict(self, x: Tensor) -> dict[str, Tensor]:
        return self._single_scale(x)

    def forward(self, x: Tensor) -> Union[Tensor, dict[str, Tensor]]:
        outputs = self._predict(x)
        if "aux" in outputs:
            return outputs
        return outputs["out"]


class DeepLabV1(DeepLab):
    """DeepLab-v1 LargeFOV (Chen et al., ICLR 2015): VGG-16 at output stride 8 + `LargeFOV`."""


MSC_FUSION = ("input_size", "score_map")
MSC_RESIZE = ("size", "scale_factor")


class DeepLabV2(DeepLab):
    """DeepLab-v2 (Chen et al., TPAMI 2017): ASPP-L/S summed branches, optional MSC.

    MSC runs the network on an input pyramid (`msc_scales`, e.g. (1, 0.75, 0.5)) and fuses the
    logits by pixel-wise max, either after resizing each to the input size (`msc_fusion=
    "input_size"`, as the paper's text says: "bilinearly interpolate ... to the original image
    resolution and fuse") or at the stride-8 score-map size of the scale-1 input, upsampling only
    the fused map (`"score_map"`, as the reference Caffe model and kazuto1011's port compute it).
    `msc_resize` is how the pyramid is made: `"size"` resizes to int(H * s) x int(W * s);
    `"scale_factor"` passes s to `interpolate` (same sizes, sampled at exactly 1 / s).
    The fused logits are returned in training too (the paper also supervises each scale; the
    fused output carries the gradient to all of them).
    """

    msc_scales: list[float]  # class-level, so TorchScript can type an empty list

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        aux_classifier: Optional[nn.Module] = None,
        msc_scales: Sequence[float] = (),
        msc_fusion: str = "input_size",
        msc_resize: str = "size",
    ) -> None:
        super().__init__(backbone, classifier, aux_classifier)
        self.msc_scales = [float(scale) for scale in msc_scales]
        for value, choices, what in ((msc_fusion, MSC_FUSION, "msc_fusion"), (msc_resize, MSC_RESIZE, "msc_resize")):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; choose from: {', '.join(choices)}")
        if msc_fusion == "score_map" and self.msc_scales and 1.0 not in self.msc_scales:
            raise ValueError(f"msc_fusion='score_map' fuses at the scale-1 score map: msc_scales must include 1, "
                             f"got {tuple(self.msc_scales)}")
        self.fuse_at_score_map = msc_fusion == "score_map"
        self.resize_by_factor = msc_resize == "scale_factor"

    def _rescale(self, x: Tensor, scale: float) -> Tensor:
        if scale == 1.0:
            return x
        if self.resize_by_factor:
            return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        size = x.shape[-2:]
        return resize(x, [int(size[0] * scale), int(size[1] * scale)])

    def _predict(self, x: Tensor) -> dict[str, Tensor]:
        if len(self.msc_scales) == 0:
            return self._single_scale(x)
        size = x.shape[-2:]
        if not self.fuse_at_score_map:
            fused: dict[str, Tensor] = {}
            for scale in self.msc_scales:
                for name, logits in self._single_scale(self._rescale(x, scale)).items():
                    logits = resize(logits, size)
                    fused[name] = torch.maximum(fused[name], logits) if name in fused else logits
            return fused
        # Score-map fusion: every scale's scores resized to the scale-1 score map, max, then upsampled.
        full = self._scores(x)
        fused = dict(full)
        for scale in self.msc_scales:
            if scale != 1.0:
                for name, scores in self._scores(self._rescale(x, scale)).items():
                    fused[name] = torch.maximum(fused[name], resize(scores, full[name].shape[-2:]))
        return {name: resize(scores, size) for name, scores in fused.items()}


class DeepLabV3(DeepLab):
    """DeepLabv3 (Chen et al., 2017): (multi-grid) dilated ResNet + ASPP with image pooling."""


class DeepLabV3Plus(DeepLab):
    """DeepLabv3+ (Chen et al., ECCV 2018): the v3 encoder + a decoder on stride-4 features."""

    def _classify(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"], features["low"])
