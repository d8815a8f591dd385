"""DeepLab v1/v2/v3/v3+ models; `build_model` is the one entry point (see docs/models.md)."""

from .deeplab import DeepLab, DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus
from .factory import ARCHS, BACKBONES, build_model, check_model_arguments, param_groups

__all__ = [
    "ARCHS",
    "BACKBONES",
    "check_model_arguments",
    "DeepLab",
    "DeepLabV1",
    "DeepLabV2",
    "DeepLabV3",
    "DeepLabV3Plus",
    "build_model",
    "param_groups",
]
