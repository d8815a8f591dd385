"""Multi-scale + horizontal-flip test-time augmentation (DeepLab v2 MSC, v3/v3+ evaluation).

For every scale the batch is resized (bilinear, align_corners=False), run through the model, and
- with `flip` - run again mirrored, the mirrored logits flipped back. Each forward's logits are
turned into probabilities by a softmax and resized back to the input size; the scales are then
fused pixel-wise by their mean (v3/v3+) or their max (v2's MSC max-fusion, renormalised so that
each pixel's probabilities still sum to 1).

Memory budget: `max_pixels` caps the size of one scaled image (H x W per image, not per batch).
A scaled image above the cap is not run whole: it is cut into overlapping tiles of at most
`max_pixels` pixels (sliding window, a third of a tile overlap) whose logits are averaged where
they overlap, so peak activation memory stays that of one `max_pixels` forward whatever the
image size or scale.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_core.constants import DEFAULT_SCALES, TTASettings

TILE_OVERLAP = 1 / 3  # fraction of a tile shared with its neighbour (mmseg/DeepLab slide default)
# Below this many feature cells along the short side (scaled size / output stride) a scale mostly
# adds blur: ASPP's rates and image pooling see padding, and the fused average gets worse.
MIN_FEATURE_CELLS = 4

log = logging.getLogger(__name__)
_warned: set[tuple[int, int, float, int]] = set()


def warn_small_scales(model: nn.Module, height: int, width: int, scales: Sequence[float]) -> list[float]:
    """The scales at which an image of `height` x `width` gives the model fewer than
    MIN_FEATURE_CELLS feature cells on its short side; logged once per (size, scale, stride).
    The output stride is the model's `config["output_stride"]` (models without one: not checked)."""
    stride = (getattr(model, "config", None) or {}).get("output_stride")
    if not stride:
        return []
    small = []
    for scale in scales:
        short = min(_scaled_size(height, width, scale))
        if short / stride < MIN_FEATURE_CELLS:
            small.append(scale)
            key = (height, width, float(scale), int(stride))
            if key not in _warned:
                _warned.add(key)
                log.warning("TTA scale %g shrinks %dx%d images to a short side of %d px = %.1f feature "
                            "cells at output stride %d (< %d): this scale can lower the fused result; "
                            "drop it or use larger scales (docs/segmentation.md, 'Choosing test scales')",
                            scale, height, width, short, short / stride, stride, MIN_FEATURE_CELLS)
    return small


def _forward_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if isinstance(out, dict):  # aux heads only return dicts in training, but be lenient
        out = out["out"]
    return out.float()


def _tile_starts(length: int, tile: int) -> list[int]:
    """Window starts covering [0, length) with `tile`-long windows overlapping by TILE_OVERLAP."""
    if tile >= length:
        return [0]
    stride = max(1, math.ceil(tile * (1 - TILE_OVERLAP)))
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def tile_shape(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The largest tile (th, tw) with th * tw <= max_pixels, as square as the image allows."""
    side = math.isqrt(max_pixels)
    tile_h = min(height, side)
    tile_w = min(width, max_pixels // tile_h)
    tile_h = min(height, max_pixels // tile_w)  # a thin image gives the spare pixels to height
    return tile_h, tile_w


def sliding_window_logits(model: nn.Module, images: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """Logits of `images` computed in overlapping tiles of at most `max_pixels` pixels each."""
    n, _, height, width = images.shape
    tile_h, tile_w = tile_shape(height, width, max_pixels)
    logits_sum: torch.Tensor | None = None
    counts = torch.zeros(1, 1, height, width, device=images.device)
    for top in _tile_starts(height, tile_h):
        for left in _tile_starts(width, tile_w):
            tile = images[:, :, top:top + tile_h, left:left + tile_w]
            tile_logits = _forward_logits(model, tile)
            if logits_sum is None:
                logits_sum = images.new_zeros((n, tile_logits.shape[1], height, width), dtype=torch.float32)
            logits_sum[:, :, top:top + tile_h, left:left + tile_w] += tile_logits
            counts[:, :, top:top + tile_h, left:left + tile_w] += 1
    return logits_sum / counts


def _logits(model: nn.Module, images: torch.Tensor, max_pixels: int | None) -> torch.Tensor:
    height, width = images.shape[-2:]
    if max_pixels is not None and height * width > max_pixels:
        return sliding_window_logits(model, images, max_pixels)
    return _forward_logits(model, images)


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def _check_args(images: torch.Tensor, scales: Sequence[float], fusion: str, max_pixels: int | None) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a normalised N x 3 x H x W tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised), got {images.dtype}")
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {tuple(scales)}")
    if fusion not in ("mean", "max"):
        raise ValueError(f"fusion must be 'mean' or 'max', got {fusion!r}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive pixel count, got {max_pixels}")


def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    fusion: str = "mean",
    max_pixels: int | None = None,
    *,
    autocast: bool | None = None,
) -> torch.Tensor:
    """`predict` with the settings as keywords (`TTASettings(scales, flip, fusion)`)."""
    _check_args(images, scales, fusion, max_pixels)
    return predict(model, images, TTASettings(tuple(scales), flip, fusion), max_pixels, autocast=autocast)


def predict(
    model: nn.Module,
    images: torch.Tensor,
    tta: TTASettings = TTASettings(),
    max_pixels: int | None = None,
    *,
    autocast: bool | None = None,
) -> torch.Tensor:
    """Class probabilities `N x C x H x W` (float32, summing to 1 per pixel) for `images`.

    `images` is a normalised float `N x 3 x H x W` tensor; it is moved to the model's device.
    At every scale of `tta`, each of its views is run and its softmax mapped back and averaged;
    the scales are then fused (`tta.fusion`). `autocast` runs the forwards in bfloat16 autocast;
    None means on for CUDA, off otherwise. The model is put in eval mode for the call and its
    previous mode restored afterwards.
    """
    _check_args(images, tta.scales, tta.fusion, max_pixels)
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    images = images.to(device)
    if autocast is None:
        autocast = device.type == "cuda"
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if autocast else nullcontext()

    height, width = images.shape[-2:]
    warn_small_scales(model, height, width, tta.scales)
    views = tta.views()
    was_training = model.training
    model.eval()
    fused: torch.Tensor | None = None
    try:
        with torch.inference_mode(), amp:
            for scale in tta.scales:
                size = _scaled_size(height, width, scale)
                scaled = images if size == (height, width) else F.interpolate(
                    images, size=size, mode="bilinear", align_corners=False)
                probs = views[0](_logits(model, views[0](scaled), max_pixels)).softmax(dim=1)
                for view in views[1:]:
                    probs = probs + view(_logits(model, view(scaled), max_pixels)).softmax(dim=1)
                if len(views) > 1:
                    probs = probs / len(views)
                if size != (height, width):
                    probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
                if fused is None:
                    fused = probs
                elif tta.fusion == "mean":
                    fused += probs
                else:
                    fused = torch.maximum(fused, probs)
    finally:
        model.train(was_training)
    if tta.fusion == "mean":
        return fused / len(tta.scales)
    return fused / fused.sum(dim=1, keepdim=True)
