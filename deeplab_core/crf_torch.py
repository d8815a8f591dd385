"""Dense CRF mean-field inference in PyTorch: pydensecrf's model on batches of tensors, any device.

The model is Krähenbühl & Koltun (2011) as pydensecrf sets it up through `DenseCRF2D`,
`addPairwiseGaussian` and `addPairwiseBilateral`: unary -log(p), Potts compatibility, diagonal
Gaussian kernels filtered on a permutohedral lattice with symmetric normalisation
(k(Q) = n * lattice(n * Q), n = 1 / sqrt(lattice(1))), and mean-field updates
Q <- softmax(-U + sum_k w_k k(Q)). Each kernel's lattice is built once per batch and reused by
every iteration, so the iterations are a fixed sequence of tensor ops with no host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deeplab_core.constants import MIN_PROB, CRFParams
from deeplab_core.permutohedral import PermutohedralLattice


@dataclass(frozen=True, eq=False)
class _Kernel:
    """One pairwise term: Potts weight, lattice and the symmetric normalisation n (B x N x 1)."""

    weight: float
    lattice: PermutohedralLattice
    norm: Tensor

    @classmethod
    def build(cls, weight: float, features: Tensor) -> _Kernel:
        lattice = PermutohedralLattice.build(features)
        ones = features.new_ones(*features.shape[:2], 1)
        return cls(weight, lattice, torch.rsqrt(lattice.filter(ones) + 1e-20))

    def __call__(self, q: Tensor) -> Tensor:
        return self.norm * self.lattice.filter(self.norm * q)


def _divide(values: Tensor, std: float) -> Tensor:
    # A tensor divisor: PyTorch turns division by a Python scalar into multiplication by its
    # reciprocal, which can round differently from densecrf's float division and move a key.
    return values / torch.tensor(std, dtype=torch.float32, device=values.device)


def _features(images: Tensor, xy_std: float, rgb_std: float | None) -> Tensor:
    """B x H*W x d features in densecrf's order: x (column), y (row), then r, g, b if rgb_std."""
    batch_size, height, width, _ = images.shape
    device = images.device
    y, x = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                          torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    position = torch.stack([_divide(x, xy_std), _divide(y, xy_std)], dim=-1).reshape(1, height * width, 2)
    position = position.expand(batch_size, -1, -1)
    if rgb_std is None:
        return position.contiguous()
    colour = _divide(images.reshape(batch_size, height * width, 3).to(torch.float32), rgb_std)
    return torch.cat([position, colour], dim=-1)


def _describe(value: object) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _validate(images: Tensor, probs: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be a uint8 N x H x W x 3 RGB tensor, got {_describe(images)}")
    if not isinstance(probs, Tensor) or probs.ndim != 4 or not probs.is_floating_point():
        raise ValueError(f"probs must be a float N x C x H x W tensor, got {_describe(probs)}")
    if probs.shape[2:] != images.shape[1:3]:
        raise ValueError(
            f"probs spatial size {tuple(probs.shape[2:])} (N x C x H x W) does not match image size "
            f"{tuple(images.shape[1:3])} (N x H x W x 3)")
    if probs.shape[0] != images.shape[0]:
        raise ValueError(f"probs has {probs.shape[0]} images but images has {images.shape[0]}")
    if probs.shape[1] < 2:
        raise ValueError(f"probs needs at least 2 classes, got {probs.shape[1]}")


@torch.no_grad()
def dense_crf_torch(
    images: Tensor,
    probs: Tensor,
    params: CRFParams = CRFParams(),
) -> Tensor:
    """Refined probabilities `N x C x H x W` (float32, on `probs.device`) for same-size `images`
    (uint8 `N x H x W x 3` RGB, channels last like the numpy path; moved to `probs.device`) and
    `probs` (float `N x C x H x W`, e.g. softmax output). A weight of 0 drops its kernel.

    Same parameters and model as `deeplab_core.crf.dense_crf`; most callers go through
    `deeplab_core.crf.refine`. Memory is dominated by the
    bilateral lattice: about (d+1) = 6 vertex indices and weights per pixel plus a few
    vertices x C float32 buffers while filtering.
    """
    _validate(images, probs)
    batch_size, num_classes, height, width = probs.shape
    images = images.to(probs.device)
    unary = -torch.log(probs.to(torch.float32).clamp(MIN_PROB, 1.0))
    unary = unary.reshape(batch_size, num_classes, height * width).transpose(1, 2)  # B x N x C

    kernels: list[_Kernel] = []
    if params.pos_w > 0:
        kernels.append(_Kernel.build(params.pos_w, _features(images, params.pos_xy_std, None)))
    if params.bi_w > 0:
        kernels.append(_Kernel.build(params.bi_w, _features(images, params.bi_xy_std, params.bi_rgb_std)))

    q = torch.softmax(-unary, dim=-1)
    for _ in range(params.iterations):
        # Potts compatibility is -w, and pydensecrf subtracts the message: + w * k(Q).
        energy = -unary
        for kernel in kernels:
            energy = energy + kernel.weight * kernel(q)
        q = torch.softmax(energy, dim=-1)
    return q.transpose(1, 2).reshape(batch_size, num_classes, height, width).contiguous()
