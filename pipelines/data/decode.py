"""Bytes -> validated arrays: a uint8 RGB image and a uint8 label mask, or :class:`BadInput`.

Images decode with OpenCV (``IMREAD_UNCHANGED``: no implicit colour conversion, 16-bit kept so we
scale it ourselves) and fall back to PIL for formats OpenCV lacks. PIL reads the header first, so
gigantic images are rejected from their declared size before any pixel is decoded, and PIL (with
``LOAD_TRUNCATED_IMAGES`` off) is the judge of truncated files: some OpenCV builds decode a
truncated JPEG with grey fill and only warn.

Conversions (convertible input is converted, not rejected):

- grayscale -> RGB by repeating the channel;
- RGBA / LA / palette with transparency -> RGB by dropping alpha (not compositing: labels were
  drawn on the colour pixels, whatever the alpha);
- 16-bit -> 8-bit by scaling the full range (``round(v / 257)``);
- EXIF orientation is ignored, as it is by the annotation tools: masks follow the stored pixels.

Masks decode with PIL so palette PNGs keep their indices (OpenCV would expand the colours).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from deeplab_core.palette import voc_palette

DEFAULT_MAX_PIXELS = 50_000_000
from deeplab_core.constants import IGNORE_INDEX  # noqa: F401 - re-exported

_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"
_PIL_MODES_TO_RGB = {"P", "PA", "LA", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "1"}

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # corrupt input is reported by us


class BadInput(ValueError):
    """An input that cannot be used. ``stage`` is ``"image"`` or ``"mask"``; ``reason`` is a short
    human-readable explanation that goes into the error record."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


# --------------------------------------------------------------------------- image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes ``data`` to a C-contiguous uint8 H x W x 3 RGB array, or raises ``BadInput("image",
    ...)`` for an empty, non-image, corrupt or truncated file, or one over ``max_pixels`` (checked
    from the header; PIL's own decompression-bomb limit, ``2 * Image.MAX_IMAGE_PIXELS``, also
    applies, so raise that too for a ``max_pixels`` above ~179 M)."""
    header = _open_header(data, "image", max_pixels)
    if not _has_end_marker(data, header.format):
        # Missing end marker: truncated, or (rarely) valid with trailing bytes. PIL decides.
        return _pil_to_rgb(_load_fully(header, "image"))
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:  # a format or variant OpenCV cannot read; PIL reads it or says why not
        return _pil_to_rgb(_load_fully(header, "image"))
    return _cv_to_rgb(array)


def _open_header(data: bytes, stage: str, max_pixels: int | None) -> Image.Image:
    """PIL's lazy open: format and size from the header, no pixel decoded yet."""
    if not data:
        raise BadInput(stage, "empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except UnidentifiedImageError:
        raise BadInput(stage, f"not a recognised image format ({_describe_start(data)})") from None
    except Image.DecompressionBombError as err:
        raise BadInput(stage, f"image too large: {err}") from None
    except Exception as err:  # noqa: BLE001 - a broken header is bad input, whatever the error
        raise BadInput(stage, f"unreadable header: {type(err).__name__}: {err}") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise BadInput(
            stage, f"image {height}x{width} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )
    return image


def _describe_start(data: bytes) -> str:
    return f"{len(data)} bytes starting {data[:8]!r}"


def _has_end_marker(data: bytes, fmt: str | None) -> bool:
    """True unless a JPEG/PNG lacks its end marker (EOI / IEND chunk), i.e. looks truncated."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI)
    if fmt == "PNG":
        return data.endswith(_PNG_IEND)
    return True


def _load_fully(image: Image.Image, stage: str) -> Image.Image:
    """Decodes every pixel; truncated or corrupt data raises instead of being filled in."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # somebody turned it on globally; it would hide damage
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must be False for validation")
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - every decoder failure is bad input
        raise BadInput(stage, f"corrupt or truncated {image.format or 'image'}: {err}") from None
    return image


def _cv_to_rgb(array: np.ndarray) -> np.ndarray:
    """OpenCV's output (gray, BGR or BGRA; 8- or 16-bit) -> uint8 RGB."""
    array = _to_uint8(array)
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    channels = array.shape[2]
    if channels == 1:
        return cv2.cvtColor(array[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)  # drops alpha
    raise BadInput("image", f"unsupported number of channels: {channels}")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded PIL image -> uint8 RGB (alpha dropped, 16-bit scaled)."""
    if image.mode in _PIL_MODES_TO_RGB:
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(_to_uint8(array))
    if array.ndim == 2:
        if array.dtype.kind in "iu" and array.dtype.itemsize > 2:  # PIL's "I" mode for 16-bit data
            if array.min() < 0 or array.max() > 65535:
                raise BadInput("image", f"unsupported {image.mode} pixel range")
            array = array.astype(np.uint16)
        return cv2.cvtColor(_to_uint8(array), cv2.COLOR_GRAY2RGB)
    raise BadInput("image", f"unsupported image mode {image.mode} with shape {array.shape}")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return cv2.convertScaleAbs(array, alpha=1.0 / 257.0)  # rounds and saturates
    raise BadInput("image", f"unsupported pixel type {array.dtype}")


# --------------------------------------------------------------------------- mask


def decode_mask(data: bytes, num_classes: int | None, image_shape: tuple[int, ...]) -> np.ndarray:
    """Decodes a label mask to uint8 H x W, or raises ``BadInput("mask", ...)``.

    Accepts single-channel PNGs (palette indices or ``L`` values, 16-bit if the values fit) and
    colour masks whose colours are exactly VOC palette colours (mapped back to indices). The size
    must equal ``image_shape[:2]``; values must lie in ``[0, num_classes)`` or be 255 (ignore).
    ``num_classes=None`` skips the range check (e.g. for inference-only inputs).
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    header = _open_header(data, "mask", max_pixels=None)
    mask_width, mask_height = header.size
    if (mask_height, mask_width) != (height, width):
        raise BadInput(
            "mask", f"mask {mask_height}x{mask_width} does not match image {height}x{width}"
        )
    labels = _mask_labels(_load_fully(header, "mask"))
    if num_classes is not None:
        _check_label_range(labels, num_classes)
    return labels.astype(np.uint8, copy=False)


def _mask_labels(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("P", "L"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image).astype(np.uint8)
    if mode == "LA" or mode == "PA":
        return np.asarray(image.getchannel(0))
    if mode.startswith("I"):  # 16/32-bit single channel: fine if the values fit the label range
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 255):
            bad = np.unique(values[(values < 0) | (values > 255)])
            raise BadInput("mask", f"mask values out of range: {_list_values(bad)}")
        return values.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        return _colours_to_labels(np.asarray(image.convert("RGB")))
    raise BadInput("mask", f"unsupported mask mode {mode}; expected a single-channel PNG")


def _colours_to_labels(rgb: np.ndarray) -> np.ndarray:
    """Maps exact VOC palette colours to their indices; any other colour rejects the mask."""
    palette = np.asarray(voc_palette(), dtype=np.int64).reshape(256, 3)
    palette_keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    order = np.argsort(palette_keys)
    sorted_keys = palette_keys[order]
    pixels = rgb.astype(np.int64)
    keys = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    positions = np.clip(np.searchsorted(sorted_keys, keys), 0, 255)
    known = sorted_keys[positions] == keys
    if not known.all():
        unknown = np.unique(keys[~known])
        colours = [((k >> 16) & 255, (k >> 8) & 255, k & 255) for k in unknown[:5].tolist()]
        raise BadInput(
            "mask",
            f"colour mask with {unknown.size} colour(s) that are not VOC palette colours, "
            f"e.g. {colours}; store labels as a palette or grayscale PNG",
        )
    return order[positions].astype(np.uint8)


def _check_label_range(labels: np.ndarray, num_classes: int) -> None:
    # One vectorised pass for the common (valid) case; the histogram only to name the culprits.
    if num_classes >= IGNORE_INDEX or not cv2.countNonZero(
        cv2.inRange(labels, num_classes, IGNORE_INDEX - 1)
    ):
        return
    counts = np.bincount(labels.ravel(), minlength=256)
    counts[:num_classes] = 0
    counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts)
    raise BadInput(
        "mask", f"mask values outside [0, {num_classes}) and not {IGNORE_INDEX}: {_list_values(bad)}"
    )


def _list_values(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if values.size > limit else ''}] ({values.size} distinct)"
