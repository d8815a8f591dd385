"""VOC palette, palette PNG masks and overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deeplab_core.palette import colorize, overlay, voc_palette


def test_voc_palette_values():
    palette = voc_palette()
    assert len(palette) == 768 and all(isinstance(v, int) and 0 <= v <= 255 for v in palette)
    rgb = np.array(palette).reshape(256, 3)
    # The VOC devkit's colours: background, aeroplane, bicycle, bird, person, and the ignore label.
    assert rgb[0].tolist() == [0, 0, 0]
    assert rgb[1].tolist() == [128, 0, 0]
    assert rgb[2].tolist() == [0, 128, 0]
    assert rgb[3].tolist() == [128, 128, 0]
    assert rgb[15].tolist() == [192, 128, 128]
    assert rgb[20].tolist() == [0, 64, 128]
    assert rgb[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in rgb}) == 256  # every label its own colour


def test_colorize_is_a_lossless_palette_png():
    mask = np.array([[0, 1, 2], [255, 20, 5]], dtype=np.int64)
    image = colorize(mask)
    assert image.mode == "P" and image.size == (3, 2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    reread = Image.open(io.BytesIO(buffer.getvalue()))
    assert reread.mode == "P"
    np.testing.assert_array_equal(np.array(reread), mask)
    rgb = np.array(reread.convert("RGB"))
    assert rgb[1, 0].tolist() == [224, 224, 192]  # ignore
    assert rgb[0, 1].tolist() == [128, 0, 0]


def test_colorize_rejects_bad_masks():
    with pytest.raises(ValueError, match="integer H x W"):
        colorize(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        colorize(np.array([[0, 256]]))


def test_overlay_blends_colours():
    image = np.full((4, 6, 3), 200, np.uint8)
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 1  # (128, 0, 0)
    np.testing.assert_array_equal(overlay(image, mask, alpha=0.0), image)
    full = overlay(image, mask, alpha=1.0)
    assert full[0, 0].tolist() == [0, 0, 0] and full[0, 5].tolist() == [128, 0, 0]
    half = overlay(image, mask, alpha=0.5)
    assert half.dtype == np.uint8 and half.shape == image.shape
    assert half[0, 5].tolist() == [164, 100, 100]
    assert half[0, 0].tolist() == [100, 100, 100]


def test_overlay_validates():
    image = np.zeros((4, 6, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((6, 4), np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, np.zeros((4, 6), np.uint8), alpha=1.5)
    with pytest.raises(ValueError, match="uint8"):
        overlay(image.astype(np.float32), np.zeros((4, 6), np.uint8))
