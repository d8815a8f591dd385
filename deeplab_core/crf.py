"""Fully connected (dense) CRF post-processing, DeepLab v1/v2 style, with two backends.

The unary is `-log(p)` of the network's probabilities; the pairwise terms are a Gaussian
smoothness kernel (position only) and a bilateral appearance kernel (position and RGB) on the
raw uint8 image - not the mean-subtracted network input. Defaults are DeepLab v2's ResNet-101
VOC values: 10 mean-field iterations, Gaussian w=3 xy=1, bilateral w=4 xy=67 rgb=3.

Backends, the same model (Krähenbühl & Koltun 2011 mean field on permutohedral-lattice filters):

- "pydensecrf" (default): the C++ extension from the `pydensecrf2` distribution, imported on
  first use. It holds the GIL for the whole inference (~1-1.5 s per VOC-size image on one core),
  so callers run it in separate processes. The fastest choice on CPU.
- "torch": `deeplab_core.crf_torch`, a plain PyTorch re-implementation (no pydensecrf needed)
  that runs on any device and refines whole batches of same-size images at once
  (`dense_crf_torch`). It matches pydensecrf to float32 rounding (all labels equal, max
  probability difference ~1e-6 at VOC size). The choice on a GPU; on one CPU thread it takes
  3.3x (500x375) to 6.7x (2048x1024) pydensecrf's CPU time (docs/benchmarks.md).

Neither backend imports torch or pydensecrf until it is used, so importing this module is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MIN_PROB = 1e-8  # -log(1e-8) ~ 18.4: a finite unary for probabilities that underflowed to 0
BACKENDS: tuple[str, ...] = ("pydensecrf", "torch")


def _validate(image: np.ndarray, probs: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 H x W x 3 RGB array, got {desc}")
    if not isinstance(probs, np.ndarray) or probs.ndim != 3 or not np.issubdtype(probs.dtype, np.floating):
        desc = f"{probs.dtype} {probs.shape}" if isinstance(probs, np.ndarray) else type(probs).__name__
        raise ValueError(f"probs must be a float C x H x W array, got {desc}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs spatial size {probs.shape[1:]} (C x H x W) does not match image size "
            f"{image.shape[:2]} (H x W x 3)")
    if probs.shape[0] < 2:
        raise ValueError(f"probs needs at least 2 classes, got {probs.shape[0]}")


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    pos_w: float = 3,
    pos_xy_std: float = 1,
    bi_w: float = 4,
    bi_xy_std: float = 67,
    bi_rgb_std: float = 3,
    backend: str = "pydensecrf",
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Refined class probabilities `C x H x W` (float32) for `image` (uint8 H x W x 3 RGB) and
    `probs` (float C x H x W, e.g. softmax output; float16 is fine). A weight of 0 drops its kernel.

    `backend` is one of `BACKENDS`; `device` (torch backend only, default CPU) is where the torch
    backend computes. For batches of tensors already on a device, call
    `deeplab_core.crf_torch.dense_crf_torch` directly.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device is not None and backend != "torch":
        raise ValueError(f"device is only used by the torch backend, got backend={backend!r}")
    _validate(image, probs)
    params = dict(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                  bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std)
    if backend == "torch":
        return _dense_crf_torch(image, probs, device, **params)
    return _dense_crf_pydensecrf(image, probs, **params)


def _dense_crf_torch(image: np.ndarray, probs: np.ndarray, device: str | torch.device | None,
                     **params: float) -> np.ndarray:
    import torch

    from deeplab_core.crf_torch import dense_crf_torch

    # torch.tensor copies: torch.from_numpy rejects negative strides and warns on read-only arrays.
    images = torch.tensor(image, device=device)[None]
    probs_t = torch.tensor(probs, device=device)[None]
    return dense_crf_torch(images, probs_t, **params)[0].cpu().numpy()


def _dense_crf_pydensecrf(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int,
    pos_w: float,
    pos_xy_std: float,
    bi_w: float,
    bi_xy_std: float,
    bi_rgb_std: float,
) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    num_classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_classes)  # width first
    unary = -np.log(np.clip(probs.astype(np.float32, copy=False), MIN_PROB, 1.0))
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(num_classes, -1), dtype=np.float32))
    if pos_w > 0:
        crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    if bi_w > 0:
        # pydensecrf's typed memoryviews need a writable C-contiguous buffer (arrays from Arrow or
        # shared memory are read-only): np.require copies only when it has to.
        rgb = np.require(image, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=rgb, compat=bi_w)
    refined = crf.inference(iterations)
    return np.asarray(refined, dtype=np.float32).reshape(num_classes, height, width)
