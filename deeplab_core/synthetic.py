"""Deterministic synthetic segmentation scenes (numpy arrays in, numpy arrays out; no I/O).

A scene is a textured background with background clutter, overlaid by objects of five shape
classes at very different scales, painted in order so later objects occlude earlier ones. It is
built to be hard for anything that looks at one pixel at a time:

- every class draws its colour from a wide Gaussian around a nearby class mean, and the
  background (including clutter blobs, labelled background) draws from the same mixture, so one
  pixel's colour says little about its class;
- what identifies a class is spatial: its outline (disc, square, triangle, ring, bar) and a
  class-specific texture (shading, stripes, gradient, grain, dashes);
- object diameters span 10 % to 90 % of the short side (log-uniform), so context at several
  scales is needed;
- blur and sensor-like noise soften edges, and, as in PASCAL VOC, every label boundary carries a
  thin band of ``IGNORE_INDEX`` in the mask (image untouched).

Shapes are rendered from signed distances in each object's rotated frame (negative inside), which
gives anti-aliased image edges and exact masks in a few vectorised numpy operations on the
object's bounding box only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("background", "disc", "square", "triangle", "ring", "bar")
from deeplab_core.constants import IGNORE_INDEX  # noqa: F401 - re-exported

# Class colour means (RGB, 0-255). They sit close together and every object's colour is drawn
# with a standard deviation (COLOUR_STD * spec.colour_spread) that dwarfs their spacing.
_CLASS_MEANS = np.array(
    [
        [128, 124, 116],  # background (used for its share of the mixture)
        [150, 110, 100],  # disc
        [110, 135, 120],  # square
        [120, 115, 150],  # triangle
        [145, 140, 95],  # ring
        [105, 125, 145],  # bar
    ],
    dtype=np.float32,
)
COLOUR_STD = 55.0


@dataclass(frozen=True)
class SyntheticSpec:
    """Scene size and difficulty knobs. Defaults are the calibrated setting in docs/data.md."""

    num_classes: int = 6  # background + (num_classes - 1) shape classes, 2..len(CLASS_NAMES)
    height: int = 96
    width: int = 128
    min_objects: int = 3
    max_objects: int = 8
    min_object_size: float = 0.1  # object diameter as a fraction of min(height, width)
    max_object_size: float = 0.9
    colour_spread: float = 1.0  # multiplies COLOUR_STD: higher -> more colour overlap
    texture_contrast: float = 1.0  # strength of the class-specific textures (the spatial cue)
    clutter: int = 4  # background blobs drawn from the object colour mixture
    max_blur_sigma: float = 1.0  # Gaussian blur sigma ~ U[0, max]
    noise_std: float = 6.0  # additive Gaussian pixel noise (0-255 scale)
    ignore_width: int = 1  # ignore band, pixels on each side of every label boundary (0: none)

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {self.num_classes}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"scene must be at least 8x8, got {self.height}x{self.width}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_object_size <= self.max_object_size:
            raise ValueError("need 0 < min_object_size <= max_object_size")
        for name in ("colour_spread", "texture_contrast", "max_blur_sigma", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clutter < 0 or self.ignore_width < 0:
            raise ValueError("clutter and ignore_width must be >= 0")


# --------------------------------------------------------------------------- shapes
# Each shape maps local rotated coordinates (u, v) and a size r to a signed distance in pixels.


def _disc(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    return np.sqrt(u * u + v * v) - r


def _square(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    aspect = rng.uniform(0.75, 1.0)  # near-square rectangles
    return np.maximum(np.abs(u) - r * 0.85, np.abs(v) - r * 0.85 * aspect)


def _triangle(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    # Equilateral: the max over the three edge half-planes; inradius = circumradius / 2.
    angles = np.array([np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3])
    dist = u * np.cos(angles[0]) + v * np.sin(angles[0])
    for angle in angles[1:]:
        dist = np.maximum(dist, u * np.cos(angle) + v * np.sin(angle))
    return dist - r * 0.7  # inradius 0.7 r: about the area of a disc of radius r


def _ring(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    inner = r * rng.uniform(0.45, 0.7)
    return np.abs(np.sqrt(u * u + v * v) - (r + inner) / 2) - (r - inner) / 2


def _bar(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    half_width = max(1.5, r * rng.uniform(0.2, 0.35))
    return np.maximum(np.abs(u) - r * 1.6, np.abs(v) - half_width)


def _blob(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    # Background clutter: a wobbly star-shaped blob, unlike any object class outline.
    theta = np.arctan2(v, u)
    radius = r * (1 + sum(rng.uniform(-0.25, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)))
    return np.sqrt(u * u + v * v) - radius


# --------------------------------------------------------------------------- textures
# Each texture returns a per-pixel multiplicative/additive modulation of the object's base colour
# in (u, v); its statistics are what a spatial model can learn and a per-pixel one cannot.

TextureFn = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]


def _shading(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    return 0.45 * (0.5 - (u * u + v * v) / (r * r))  # bright centre, dark rim


def _stripes(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    period = max(3.0, r * rng.uniform(0.35, 0.6))
    return 0.3 * np.sin(2 * np.pi * u / period)


def _gradient(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    return 0.35 * v / r


def _grain(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 0.12, size=u.shape).astype(np.float32)


def _dashes(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    period = max(4.0, r * rng.uniform(0.4, 0.7))
    return 0.3 * np.sign(np.sin(2 * np.pi * u / period))


def _flat(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    return np.zeros_like(u)


# class index -> (signed distance, texture); index 0 is the background clutter.
_CLASSES: tuple[tuple[Callable, TextureFn], ...] = (
    (_blob, _flat),
    (_disc, _shading),
    (_square, _stripes),
    (_triangle, _gradient),
    (_ring, _grain),
    (_bar, _dashes),
)


# --------------------------------------------------------------------------- rendering


def _draw_colour(rng: np.random.Generator, class_index: int, spread: float) -> np.ndarray:
    colour = _CLASS_MEANS[class_index] + rng.normal(0.0, COLOUR_STD * spread, size=3)
    return np.clip(colour, 10, 245).astype(np.float32)


def _background(rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """Four corner colours from the object colour mixture, bilinearly blended, plus low-frequency
    blotches: the background's colour statistics are those of the objects."""
    corner_classes = rng.integers(0, spec.num_classes, size=4)
    corners = np.stack([_draw_colour(rng, int(c), spec.colour_spread) for c in corner_classes])
    image = cv2.resize(corners.reshape(2, 2, 3), (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    blotches = rng.normal(0.0, 18.0, size=(4, 5, 3)).astype(np.float32)
    image += cv2.resize(blotches, (spec.width, spec.height), interpolation=cv2.INTER_CUBIC)
    return image


def _paint(
    image: np.ndarray,
    label: np.ndarray,
    class_index: int,
    size: float,
    rng: np.random.Generator,
    spec: SyntheticSpec,
) -> None:
    """Paints one shape of ``class_index`` (rotated, textured, anti-aliased) and its label in place;
    class 0 is a background clutter blob."""
    height, width = label.shape
    shape_fn, texture_fn = _CLASSES[class_index]
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    reach = int(np.ceil(size * 1.8)) + 2  # bounds every shape (clutter blobs reach 1.75 r)
    y0, y1 = max(0, int(cy) - reach), min(height, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(width, int(cx) + reach + 1)
    if y0 >= y1 or x0 >= x1:
        return
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = xs * cos + ys * sin
    v = ys * cos - xs * sin
    distance = shape_fn(u, v, size, rng)
    alpha = np.clip(0.5 - distance, 0.0, 1.0)[..., None]  # 1-px anti-aliased edge
    colour = _draw_colour(rng, class_index, spec.colour_spread)
    modulation = spec.texture_contrast * texture_fn(u, v, size, rng)
    texture = colour * (1.0 + modulation[..., None])
    region = image[y0:y1, x0:x1]
    region += alpha * (texture - region)
    label[y0:y1, x0:x1][distance < 0] = class_index


def _ignore_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of a label change (morphological gradient != 0)."""
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return cv2.morphologyEx(label, cv2.MORPH_GRADIENT, kernel) != 0


def render_scene(spec: SyntheticSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders one scene; the same ``(spec, seed)`` always gives identical arrays.

    Returns ``(image uint8 HxWx3 RGB, mask uint8 HxW)`` with mask values in
    ``[0, spec.num_classes)`` or ``IGNORE_INDEX`` (255) on a thin band along label boundaries.
    """
    rng = np.random.default_rng(seed)
    image = _background(rng, spec)
    label = np.zeros((spec.height, spec.width), np.uint8)
    short_side = min(spec.height, spec.width)

    for _ in range(spec.clutter):  # background blobs: object-like colours, background label
        size = short_side * rng.uniform(0.05, 0.3)
        _paint(image, label, 0, size, rng, spec)

    num_objects = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    log_min, log_max = np.log(spec.min_object_size), np.log(spec.max_object_size)
    for _ in range(num_objects):  # painted in order: later objects occlude earlier ones
        class_index = int(rng.integers(1, spec.num_classes))
        size = 0.5 * short_side * float(np.exp(rng.uniform(log_min, log_max)))
        _paint(image, label, class_index, size, rng, spec)

    if spec.max_blur_sigma > 0:
        sigma = rng.uniform(0.0, spec.max_blur_sigma)
        if sigma > 0.2:
            image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    if spec.noise_std > 0:
        image += rng.normal(0.0, spec.noise_std, size=image.shape).astype(np.float32)
    image_u8 = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    mask = label
    if spec.ignore_width > 0:
        mask = label.copy()
        mask[_ignore_band(label, spec.ignore_width)] = IGNORE_INDEX
    return image_u8, mask
