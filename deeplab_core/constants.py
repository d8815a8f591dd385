"""Numbers the whole project shares, defined once. Imports nothing heavy (no torch, no cv2), so
Ray CPU workers that only decode or write can use them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255  # mask value that losses, metrics and padding treat as "no label"

# torchvision's ImageNet statistics, for RGB inputs scaled to [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The DeepLab v3/v3+ papers' multi-scale evaluation scales.
DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters; the defaults are DeepLab v2's (ResNet-101, VOC)."""

    iterations: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
