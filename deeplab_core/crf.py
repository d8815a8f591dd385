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
The parameters are one `deeplab_core.constants.CRFParams` (their only definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from deeplab_core.constants import MIN_PROB, CRFParams

if TYPE_CHECKING:
    import torch

BACKENDS: tuple[str, ...] = ("pydensecrf", "torch")
AUTO = "auto"


def choose_backend(setting: str, on_gpu: bool) -> str:
    """The backend for a setting of `BACKENDS` or `auto`: `auto` is the torch CRF where the model
    runs on a GPU (probabilities stay on the device), pydensecrf on CPU, where bench/crf.py
    measures it 3-7x faster per CPU-second."""
    if setting == AUTO:
        return "torch" if on_gpu else "pydensecrf"
    if setting not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join((AUTO, *BACKENDS))}, got {setting!r}")
    return setting


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


def _check_backend(backend: str, device: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device is not None and backend != "torch":
        raise ValueError(f"device is only used by the torch backend, got backend={backend!r}")


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    params: CRFParams = CRFParams(),
    backend: str = "pydensecrf",
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Refined class probabilities `C x H x W` (float32) for `image` (uint8 H x W x 3 RGB) and
    `probs` (float C x H x W, e.g. softmax output; float16 is fine). A weight of 0 drops its kernel.

    `backend` is one of `BACKENDS`; `device` (torch backend only, default CPU) is where the torch
    backend computes. Batches (and tensors already on a device): `refine`.
    """
    _check_backend(backend, device)
    _validate(image, probs)
    if backend == "torch":
        import torch

        from deeplab_core.crf_torch import dense_crf_torch

        # torch.tensor copies: torch.from_numpy rejects negative strides and warns on read-only arrays.
        images = torch.tensor(image, device=device)[None]
        probs_t = torch.tensor(probs, device=device)[None]
        return dense_crf_torch(images, probs_t, params)[0].cpu().numpy()
    return _dense_crf_pydensecrf(image, probs, params)


def refine(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray] | torch.Tensor,
    params: CRFParams = CRFParams(),
    backend: str = "pydensecrf",
    device: str | torch.device | None = None,
) -> list[np.ndarray]:
    """The CRF labels (uint8 H x W, the argmax of the refined probabilities) of a batch: the one
    entry the segmentation stages and the CRF search call, whichever backend.

    `images` are uint8 H x W x 3 RGB arrays; `probs` their C x H x W probabilities, as arrays or
    (torch backend) one N x C x H x W tensor, e.g. still on the model's device. pydensecrf refines
    one image at a time; the torch backend refines same-size images as one batch on `device`
    (default: the tensor's device, else CPU) and only the labels come back to the host.
    """
    _check_backend(backend, None if backend != "torch" else device)
    if backend == "pydensecrf":
        return [dense_crf(image, p, params).argmax(0).astype(np.uint8) for image, p in zip(images, probs)]
    import torch

    from deeplab_core.crf_torch import dense_crf_torch

    if isinstance(probs, torch.Tensor):
        probs_t = probs.to(device) if device is not None else probs
    else:
        probs_t = torch.stack([torch.tensor(p, device=device) for p in probs])
    rgb = torch.from_numpy(np.stack(images))
    refined = dense_crf_torch(rgb, probs_t.float(), params)
    return list(refined.argmax(1).to(torch.uint8).cpu().numpy())


def _dense_crf_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    num_classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_classes)  # width first
    unary = -np.log(np.clip(probs.astype(np.float32, copy=False), MIN_PROB, 1.0))
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(num_classes, -1), dtype=np.float32))
    if params.pos_w > 0:
        crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    if params.bi_w > 0:
        # pydensecrf's typed memoryviews need a writable C-contiguous buffer (arrays from Arrow or
        # shared memory are read-only): np.require copies only when it has to.
        rgb = np.require(image, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=rgb, compat=params.bi_w)
    refined = crf.inference(params.iterations)
    return np.asarray(refined, dtype=np.float32).reshape(num_classes, height, width)
