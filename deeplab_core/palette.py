"""The PASCAL VOC colour map, colourised label masks and colour overlays."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from deeplab_core.constants import IGNORE_INDEX  # noqa: F401 - re-exported


@lru_cache(maxsize=1)
def _palette_array() -> np.ndarray:
    """256 x 3 uint8: the VOC devkit's bit-interleaved colour map (`labelcolormap` / `bitget`).

    Bits 0, 1, 2 of the label go to the most significant free bit of R, G, B respectively, three
    bits per round, so neighbouring labels get distinct colours and 255 (ignore) is (224, 224, 192).
    """
    labels = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (labels >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return colours.astype(np.uint8)


def voc_palette() -> list[int]:
    """The VOC palette as 768 ints (R, G, B for labels 0..255), the form `Image.putpalette` takes."""
    return _palette_array().reshape(-1).tolist()


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be an integer H x W array, got {mask.dtype} {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("mask labels must be in [0, 255] to be stored as a palette image")
    return mask.astype(np.uint8, copy=False)


def colorize(mask: np.ndarray) -> Image.Image:
    """A mode "P" image whose pixel values are the labels and whose palette is VOC's.

    Saved as PNG it is both a viewable colour image and the exact label map (VOC's own format).
    """
    image = Image.fromarray(_check_mask(mask))  # mode "L"; putpalette turns it into "P"
    image.putpalette(voc_palette())
    return image


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`image` (uint8 H x W x 3 RGB) blended with the mask's VOC colours: (1 - alpha) * image +
    alpha * colour, as uint8 H x W x 3."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be a uint8 H x W x 3 array")
    mask = _check_mask(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image size {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = _palette_array()[mask]
    return cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
