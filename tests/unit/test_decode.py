"""Bytes -> arrays: every kind of bad input is rejected with a reason, convertible input converted."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from deeplab_core.palette import voc_palette
from pipelines.data.decode import BadInput, decode_image, decode_mask


def rgb_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(image, (0, 0), 2)  # JPEG-friendly, still varied


def pil_bytes(array_or_image, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image, mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    return pil_bytes(image, "JPEG", quality=quality)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring a size in its IHDR chunk, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- images: good / converted


def test_rgb_png_round_trips_exactly_in_rgb_order():
    image = rgb_image()
    out = decode_image(pil_bytes(image))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, image)


def test_rgb_jpeg_decodes_close_to_the_original():
    image = rgb_image()
    out = decode_image(jpeg_bytes(image))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image.astype(int)).mean() < 3


def test_grayscale_is_converted_to_rgb():
    gray = rgb_image()[:, :, 0]
    for data in (pil_bytes(gray, mode="L"), jpeg_bytes(Image.fromarray(gray, "L"))):
        out = decode_image(data)
        assert out.shape == (48, 64, 3)
        np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
        np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    np.testing.assert_array_equal(decode_image(pil_bytes(gray, mode="L"))[:, :, 1], gray)


def test_rgba_drops_alpha_without_compositing():
    image = rgb_image()
    alpha = np.zeros((48, 64, 1), np.uint8)  # fully transparent: compositing would give black
    out = decode_image(pil_bytes(np.concatenate([image, alpha], axis=2), mode="RGBA"))
    np.testing.assert_array_equal(out, image)


def test_16_bit_grayscale_is_scaled_to_8_bit():
    values = np.array([[0, 257 * 100, 65535, 257 * 7 + 100]], np.uint16)
    ok, data = cv2.imencode(".png", values)
    assert ok
    out = decode_image(data.tobytes())
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 7])


def test_16_bit_colour_is_scaled_and_reordered_to_rgb():
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[..., 0] = 65535  # red
    rgb16[..., 2] = 257 * 50
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    out = decode_image(data.tobytes())
    np.testing.assert_array_equal(out[0, 0], [255, 0, 50])


def test_palette_image_is_expanded_to_its_colours():
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    image = Image.fromarray(labels, "L")
    image.putpalette(voc_palette())
    out = decode_image(pil_bytes(image))
    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(out, palette[labels])


def test_formats_opencv_lacks_fall_back_to_pil():
    image = rgb_image(16, 20)
    gif = pil_bytes(Image.fromarray(image).convert("P"), "GIF")
    out = decode_image(gif)
    assert out.shape == (16, 20, 3) and out.dtype == np.uint8


def test_jpeg_with_trailing_bytes_after_the_end_marker_is_accepted():
    image = rgb_image()
    out = decode_image(jpeg_bytes(image) + b"camera maker notes")
    assert np.abs(out.astype(int) - image.astype(int)).mean() < 3


# --------------------------------------------------------------------------- images: rejected


def test_zero_byte_file():
    with pytest.raises(BadInput) as err:
        decode_image(b"")
    assert err.value.stage == "image" and "empty" in err.value.reason


def test_text_file_is_not_an_image():
    with pytest.raises(BadInput, match="not a recognised image format") as err:
        decode_image(b"id,image_uri\n1,foo.jpg\n")
    assert err.value.stage == "image"


@pytest.mark.parametrize("keep", [0.25, 0.6, 0.95])
def test_truncated_jpeg_is_detected(keep):
    data = jpeg_bytes(rgb_image(96, 128))
    with pytest.raises(BadInput, match="truncated") as err:
        decode_image(data[: int(len(data) * keep)])
    assert err.value.stage == "image"


def test_jpeg_missing_only_its_end_marker_is_detected():
    data = jpeg_bytes(rgb_image())
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(BadInput, match="truncated"):
        decode_image(data[:-2])


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_png_is_detected(keep):
    data = pil_bytes(rgb_image())
    with pytest.raises(BadInput, match="truncated") as err:
        decode_image(data[: int(len(data) * keep)])
    assert err.value.stage == "image"


def test_corrupt_png_data_is_detected():
    data = bytearray(pil_bytes(rgb_image()))
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = bytes(200)  # zeroed compressed stream, CRC now wrong
    with pytest.raises(BadInput) as err:
        decode_image(bytes(data))
    assert err.value.stage == "image" and "corrupt" in err.value.reason


def test_jpeg_with_a_broken_header_is_rejected():
    data = jpeg_bytes(rgb_image())
    with pytest.raises(BadInput) as err:
        decode_image(data[:2] + b"\x00" * 200 + data[202:])
    assert err.value.stage == "image"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_over_the_pixel_limit_is_rejected_from_its_header():
    with pytest.raises(BadInput, match="exceeds max_pixels") as err:
        decode_image(pil_bytes(rgb_image(48, 64)), max_pixels=48 * 64 - 1)
    assert "48x64" in err.value.reason
    # Headers declaring huge sizes with no pixel data: rejected for their size, not decoded.
    with pytest.raises(BadInput, match="10000x12000 = 120000000 pixels exceeds max_pixels=50000000"):
        decode_image(png_header_only(12000, 10000))
    with pytest.raises(BadInput, match="too large"):  # beyond PIL's own decompression-bomb limit
        decode_image(png_header_only(60000, 60000), max_pixels=10**10)
    assert decode_image(pil_bytes(rgb_image(48, 64)), max_pixels=48 * 64).shape == (48, 64, 3)


# --------------------------------------------------------------------------- masks


def palette_png(labels: np.ndarray) -> bytes:
    image = Image.fromarray(labels.astype(np.uint8), "L")
    image.putpalette(voc_palette())
    return pil_bytes(image)


def test_palette_mask_keeps_indices_including_ignore():
    labels = np.array([[0, 1, 2], [255, 5, 0]], np.uint8)
    out = decode_mask(palette_png(labels), num_classes=6, image_shape=(2, 3, 3))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


def test_grayscale_mask_values_are_labels():
    labels = np.array([[0, 3], [255, 1]], np.uint8)
    np.testing.assert_array_equal(decode_mask(pil_bytes(labels, mode="L"), 4, (2, 2)), labels)


def test_16_bit_mask_with_label_values_is_accepted():
    labels = np.array([[0, 20], [255, 1]], np.uint16)
    ok, data = cv2.imencode(".png", labels)
    np.testing.assert_array_equal(decode_mask(data.tobytes(), 21, (2, 2)), labels.astype(np.uint8))


def test_16_bit_mask_with_large_values_is_rejected():
    ok, data = cv2.imencode(".png", np.array([[0, 300]], np.uint16))
    with pytest.raises(BadInput, match=r"out of range: \[300\]"):
        decode_mask(data.tobytes(), 21, (1, 2))


def test_mask_size_must_match_the_image():
    with pytest.raises(BadInput) as err:
        decode_mask(palette_png(np.zeros((10, 20))), 21, (20, 30, 3))
    assert err.value.stage == "mask"
    assert err.value.reason == "mask 10x20 does not match image 20x30"


def test_mask_values_out_of_range_are_listed():
    labels = np.array([[0, 1, 7], [9, 255, 9]], np.uint8)
    with pytest.raises(BadInput) as err:
        decode_mask(palette_png(labels), num_classes=6, image_shape=(2, 3))
    assert err.value.stage == "mask"
    assert "outside [0, 6)" in err.value.reason and "[7, 9]" in err.value.reason
    # Without a class count (inference inputs) the range is not checked.
    np.testing.assert_array_equal(decode_mask(palette_png(labels), None, (2, 3)), labels)


def test_rgb_mask_in_voc_colours_is_mapped_to_indices():
    labels = np.array([[0, 1, 2], [15, 255, 3]], np.uint8)
    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    out = decode_mask(pil_bytes(palette[labels], mode="RGB"), 21, (2, 3))
    np.testing.assert_array_equal(out, labels)


def test_rgb_mask_in_other_colours_is_rejected():
    colours = np.full((2, 3, 3), 17, np.uint8)
    with pytest.raises(BadInput, match="not VOC palette colours") as err:
        decode_mask(pil_bytes(colours, mode="RGB"), 21, (2, 3))
    assert err.value.stage == "mask"


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "empty"),
        (b"not a png at all", "not a recognised image format"),
    ],
)
def test_empty_and_non_image_masks(data, expected):
    with pytest.raises(BadInput, match=expected) as err:
        decode_mask(data, 21, (2, 3))
    assert err.value.stage == "mask"


def test_truncated_mask_png_is_detected():
    labels = np.random.default_rng(0).integers(0, 6, (48, 64)).astype(np.uint8)
    data = palette_png(labels)
    with pytest.raises(BadInput, match="truncated") as err:
        decode_mask(data[: len(data) // 2], 6, (48, 64))
    assert err.value.stage == "mask"
