"""DeepLab train/eval augmentation on uint8 numpy images, returning torch tensors.

Train protocol (DeepLab v2/v3/v3+): random scale s ~ U[scale_range] (image bilinear, mask nearest),
pad to at least the crop size (image with the mean pixel, mask with the ignore index), random crop,
horizontal flip, ImageNet normalisation. Eval: the whole image, normalised.

Everything runs on OpenCV/NumPy in the order that touches the fewest bytes: resize, cut the crop
window out of the (virtually) padded image, pad only that window, flip the uint8 crop, then one
fused uint8 -> float32 ``x * scale + offset`` pass per channel that writes straight into the
channel-first output tensor. This module does not change OpenCV's thread count; callers measuring
per-core throughput (bench/data_pipeline.py) or running many workers per node should call
``cv2.setNumThreads(1)`` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cv2
import numpy as np
import torch

from deeplab_core.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401


# --------------------------------------------------------------------------- helpers


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} with shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")


def _check_mask(mask: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Validates the mask and returns it in a dtype OpenCV can resize (uint8 or int32)."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    if not np.issubdtype(mask.dtype, np.integer) or mask.ndim != 2:
        raise ValueError(f"mask must be an integer HxW array, got {mask.dtype} with shape {mask.shape}")
    if mask.shape != image_hw:
        raise ValueError(f"mask shape {mask.shape} does not match image size {image_hw}")
    # OpenCV has no 64-bit integer kernels; label values always fit in int32.
    return mask if mask.dtype in (np.uint8, np.int32) else mask.astype(np.int32)


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be > 0, got {tuple(std)}")


def _mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.int64))


def normalize(
    image_uint8: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(image / 255 - mean) / std`` as a float32 3xHxW tensor, from a uint8 HxWx3 RGB array.

    Computed as one fused ``x * scale + offset`` per channel (cv2.addWeighted writing float32
    straight into the channel-first output), which is ~10x faster than numpy/torch arithmetic
    followed by an HWC -> CHW copy.
    """
    _check_image(image_uint8)
    _check_mean_std(mean, std)
    height, width = image_uint8.shape[:2]
    out = torch.empty((3, height, width), dtype=torch.float32)
    out_np = out.numpy()
    for c, channel in enumerate(cv2.split(image_uint8)):
        scale = 1.0 / (255.0 * std[c])
        offset = -mean[c] / std[c]
        target = out_np[c]
        result = cv2.addWeighted(channel, scale, channel, 0.0, offset, dst=target, dtype=cv2.CV_32F)
        if result is not target:  # OpenCV reallocated instead of writing in place
            target[...] = result
    return out


def mean_pixel(mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 RGB colour that normalises to ~0: ``round(255 * mean)`` per channel."""
    return tuple(int(round(255.0 * m)) for m in mean)  # type: ignore[return-value]


# --------------------------------------------------------------------------- train


class CropParams(NamedTuple):
    """One draw of the random train augmentation for an image of a given size."""

    scale: float
    scaled_size: tuple[int, int]  # (height, width) after resizing, before padding
    top: int  # crop offset in the padded, scaled image
    left: int
    flip: bool


@dataclass(frozen=True)
class TrainTransform:
    """Random scale, pad (mean pixel / ignore index), random crop, horizontal flip, normalise.

    ``crop_size`` is an int or a ``(height, width)`` pair. Call as ``t(image, mask, rng=None)``
    with a uint8 HxWx3 RGB image, an integer HxW mask (or None) and a ``numpy.random.Generator``
    (None draws a fresh one). Returns a float32 3 x crop_h x crop_w tensor and an int64
    crop_h x crop_w tensor (or None).
    """

    crop_size: int | tuple[int, int] = 513
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        crop_h, crop_w = self.crop_hw
        if crop_h <= 0 or crop_w <= 0:
            raise ValueError(f"crop_size must be > 0, got {self.crop_size}")
        if len(self.scale_range) != 2:
            raise ValueError(f"scale_range must be (min, max), got {self.scale_range}")
        scale_min, scale_max = self.scale_range
        if not 0 < scale_min <= scale_max:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        _check_mean_std(self.mean, self.std)
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"ignore_index must be in [0, 255], got {self.ignore_index}")

    @property
    def crop_hw(self) -> tuple[int, int]:
        if isinstance(self.crop_size, (int, np.integer)):
            return int(self.crop_size), int(self.crop_size)
        if len(self.crop_size) != 2:
            raise ValueError(f"crop_size must be an int or (height, width), got {self.crop_size}")
        return int(self.crop_size[0]), int(self.crop_size[1])

    def sample_params(self, rng: np.random.Generator, height: int, width: int) -> CropParams:
        """Draws scale, crop offset and flip, always consuming the same random numbers in the
        same order (so e.g. flip_prob=0 and 1 give the same scale and crop for one seed)."""
        crop_h, crop_w = self.crop_hw
        scale = float(rng.uniform(*self.scale_range))
        scaled_h = max(1, int(round(height * scale)))
        scaled_w = max(1, int(round(width * scale)))
        # Padding goes to the bottom/right (DeepLab's pad_to_bounding_box at offset 0, 0).
        top = int(rng.integers(0, max(scaled_h, crop_h) - crop_h + 1))
        left = int(rng.integers(0, max(scaled_w, crop_w) - crop_w + 1))
        flip = bool(rng.random() < self.flip_prob)
        return CropParams(scale, (scaled_h, scaled_w), top, left, flip)

    def apply(
        self, image: np.ndarray, mask: np.ndarray | None, params: CropParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Applies one drawn augmentation (see ``sample_params``) deterministically."""
        _check_image(image)
        if mask is not None:
            mask = _check_mask(mask, image.shape[:2])
        image_crop = self._scale_pad_crop(image, params, cv2.INTER_LINEAR, mean_pixel(self.mean))
        if params.flip:
            image_crop = cv2.flip(image_crop, 1)  # on uint8, before the 4x larger float32 copy
        image_out = normalize(image_crop, self.mean, self.std)
        if mask is None:
            return image_out, None
        # Nearest with half-pixel centres, so mask and bilinear image stay aligned.
        mask_crop = self._scale_pad_crop(mask, params, cv2.INTER_NEAREST_EXACT, self.ignore_index)
        if params.flip:
            # Measured: cv2.flip + contiguous int64 conversion beats converting a flipped view.
            mask_crop = cv2.flip(mask_crop, 1)
        return image_out, _mask_to_tensor(mask_crop)

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _check_image(image)
        rng = np.random.default_rng() if rng is None else rng
        params = self.sample_params(rng, image.shape[0], image.shape[1])
        return self.apply(image, mask, params)

    def _scale_pad_crop(
        self, array: np.ndarray, params: CropParams, interpolation: int, fill: int | tuple[int, ...]
    ) -> np.ndarray:
        crop_h, crop_w = self.crop_hw
        scaled_h, scaled_w = params.scaled_size
        if (scaled_h, scaled_w) != array.shape[:2]:
            array = cv2.resize(array, (scaled_w, scaled_h), interpolation=interpolation)
        # Cut the in-bounds part of the crop window first, then pad only that small window:
        # the crop is never larger than crop_h x crop_w, whatever the scale.
        window = array[params.top : params.top + crop_h, params.left : params.left + crop_w]
        pad_bottom, pad_right = crop_h - window.shape[0], crop_w - window.shape[1]
        if pad_bottom or pad_right:
            window = cv2.copyMakeBorder(
                window, 0, pad_bottom, 0, pad_right, cv2.BORDER_CONSTANT, value=fill
            )
        return window


# --------------------------------------------------------------------------- eval


@dataclass(frozen=True)
class EvalTransform:
    """Whole-image evaluation transform: normalise the image, keep the size, mask -> int64."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_mean_std(self.mean, self.std)

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``rng`` is accepted (and unused) so train and eval transforms are interchangeable."""
        _check_image(image)
        mask_out = None
        if mask is not None:
            mask_out = _mask_to_tensor(_check_mask(mask, image.shape[:2]))
        return normalize(image, self.mean, self.std), mask_out
