"""Permutohedral lattice (Adams, Baek & Davis 2010) in plain PyTorch tensor ops.

Gaussian filtering of N values over d-dimensional features in O(N d^2): each feature vector is
embedded in the hyperplane x_0 + ... + x_d = 0 of R^(d+1), splatted onto the d+1 vertices of the
lattice simplex that contains it, blurred with [1/2, 1, 1/2] along each of the d+1 lattice
directions, and sliced back with the same barycentric weights. The constants, the rounding and
the vertex set follow Krähenbühl's densecrf `permutohedral.cpp` (the one pydensecrf compiles), so
that a dense CRF built on this lattice is the same model as pydensecrf's, not an approximation of it.

The vertex hash table of the C++ code becomes a sort: vertex keys are packed into int64 codes,
deduplicated with `torch.unique`, and neighbours are found with `torch.searchsorted`. Everything
runs on the features' device; building costs a few host syncs, filtering none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# pydensecrf's SSE build embeds pixels 4 at a time; the zero-padded lanes of the last block are
# inserted into its hash table too, so its lattice also holds the simplex of the feature vector 0.
# Those extra vertices carry no value but relay the blur, so we add them to match it exactly.
_SIMD_BLOCK = 4


def _scale_factors(d: int) -> list[float]:
    """Diagonal of the elevation matrix E times the inverse filter std (paper p. 5-6), rounded to
    float32 exactly as densecrf computes them (double arithmetic, then stored as float)."""
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std)) for i in range(d)]


def _embed(features: Tensor) -> tuple[Tensor, Tensor]:
    """Enclosing simplex of each of P points: (keys P x (d+1) x d int64, weights P x (d+1) float32).

    `keys[p, r]` are the first d coordinates of the remainder-r vertex (the last one is implied by
    the zero sum); `weights[p, r]` is its barycentric weight.
    """
    num_points, d = features.shape
    down = float(np.float32(1.0 / (d + 1)))

    # Elevate onto the hyperplane: y = E f, computed in densecrf's order for bit-equal keys.
    elevated: list[Tensor | None] = [None] * (d + 1)
    running = features.new_zeros(num_points)
    for j, scale in reversed(list(enumerate(_scale_factors(d), start=1))):
        scaled = features[:, j - 1] * scale
        elevated[j] = running - j * scaled
        running = running + scaled
    elevated[0] = running
    elevated_t = torch.stack(elevated, dim=1)  # P x (d+1)

    # Nearest remainder-0 lattice point (coordinates multiples of d+1), then the rank of each
    # coordinate's residual (0 = largest); on ties the later coordinate ranks higher, as in densecrf.
    rounded = torch.round(elevated_t * down)
    rem0 = (rounded * (d + 1)).to(torch.int64)
    residual = elevated_t - rem0.to(elevated_t.dtype)
    rank = torch.zeros_like(rem0)
    for i in range(d):
        for j in range(i + 1, d + 1):
            less = (residual[:, i] < residual[:, j]).to(torch.int64)
            rank[:, i] += less
            rank[:, j] += 1 - less
    # If the rounded point is off the hyperplane, shift ranks (and the point) back into [0, d].
    rank += rounded.sum(dim=1, keepdim=True).to(torch.int64)
    low, high = rank < 0, rank > d
    rank = rank + (d + 1) * low - (d + 1) * high
    rem0 = rem0 + (d + 1) * low - (d + 1) * high

    # Barycentric weights (paper p. 10).
    delta = (elevated_t - rem0.to(elevated_t.dtype)) * down
    barycentric = features.new_zeros(num_points, d + 2)
    barycentric.scatter_add_(1, d - rank, delta)
    barycentric.scatter_add_(1, d - rank + 1, -delta)
    barycentric[:, 0] += 1.0 + barycentric[:, d + 1]

    # Vertex r of the simplex: rem0 plus the canonical simplex column, r - (d+1) [rank > d - r].
    remainder = torch.arange(d + 1, device=features.device).view(1, d + 1, 1)
    keys = rem0[:, None, :d] + remainder - (d + 1) * (rank[:, None, :d] > d - remainder)
    return keys, barycentric[:, : d + 1]


@dataclass(frozen=True, eq=False)
class PermutohedralLattice:
    """A lattice over a batch of B point sets of N points each (e.g. the pixels of B same-size
    images). Points of different sets never interact: the set index is part of every vertex key.

    Build it once with `PermutohedralLattice.build(features)` and call `filter` as often as needed.
    """

    vertices: Tensor  # (d+1) x B*N int64: lattice rows of each point's simplex; row 0 is "none"
    slice_weights: Tensor  # (d+1) x B*N x 1 float32: barycentric weight * alpha
    splat_weights: Tensor  # (d+1) x B*N x 1 float32: barycentric weight
    neighbours: Tensor  # (d+1) x 2 x (M+1) int64: -/+ neighbour row along each direction, 0 if none
    batch_size: int
    num_points: int

    @property
    def dim(self) -> int:
        return self.vertices.shape[0] - 1

    @property
    def num_vertices(self) -> int:
        return self.neighbours.shape[-1] - 1

    @classmethod
    def build(cls, features: Tensor) -> PermutohedralLattice:
        """Lattice for `features`: float32 B x N x d, already divided by the kernel's stds."""
        if features.ndim != 3 or features.dtype != torch.float32:
            raise ValueError(
                f"features must be a float32 B x N x d tensor, got {features.dtype} {tuple(features.shape)}")
        batch_size, num_points, d = features.shape
        device = features.device
        keys, barycentric = _embed(features.reshape(batch_size * num_points, d))
        keys = keys.view(batch_size, num_points * (d + 1), d)
        if num_points % _SIMD_BLOCK:
            pad_keys, _ = _embed(features.new_zeros(1, d))
            keys = torch.cat([keys, pad_keys.view(1, d + 1, d).expand(batch_size, -1, -1)], dim=1)

        codes, digit_values = _pack(keys)
        unique_codes, inverse = torch.unique(codes.flatten(), sorted=True, return_inverse=True)
        inverse = inverse.view(batch_size, -1)[:, : num_points * (d + 1)]
        vertices = (inverse.reshape(batch_size * num_points, d + 1).T + 1).contiguous()

        # Neighbours of vertex k along direction j: k - 1 on every coordinate but j, where it is
        # k + d (for j = d, the implied coordinate, every stored one is k - 1); and the opposite.
        # The packed code is linear in the digits, so the neighbours' codes are offsets of it.
        all_ones = sum(digit_values)
        steps = torch.tensor([(d + 1) * v - all_ones for v in digit_values] + [-all_ones], device=device)
        queries = torch.stack([unique_codes[None, :] + steps[:, None], unique_codes[None, :] - steps[:, None]], dim=1)
        neighbours = _lookup(unique_codes, queries)  # (d+1) x 2 x M
        neighbours = torch.nn.functional.pad(neighbours, (1, 0))  # row 0 stays empty: its neighbours are 0

        # densecrf's "magic scaling constant" for the slice (it cancels under symmetric normalisation
        # but keeps filter() equal to densecrf's lattice).
        alpha = 1.0 / (1.0 + 2.0 ** -d)
        splat = barycentric.T.contiguous().unsqueeze(-1)
        return cls(vertices, splat * float(np.float32(alpha)), splat, neighbours, batch_size, num_points)

    def filter(self, values: Tensor) -> Tensor:
        """Approximate Gaussian filter of `values` (B x N x C float32) over the features: for each
        point, the sum over all points of its set of exp(-|f_i - f_j|^2 / 2) * value_j."""
        if values.shape[:2] != (self.batch_size, self.num_points):
            raise ValueError(f"values must be {self.batch_size} x {self.num_points} x C, got {tuple(values.shape)}")
        flat = values.reshape(self.batch_size * self.num_points, -1)
        lattice = flat.new_zeros(self.num_vertices + 1, flat.shape[1])
        for rows, weights in zip(self.vertices, self.splat_weights):
            lattice.index_add_(0, rows, flat * weights)
        for minus, plus in self.neighbours:  # the d+1 directions in order, each on the last result
            lattice = lattice + 0.5 * (lattice[minus] + lattice[plus])
        out = torch.zeros_like(flat)
        for rows, weights in zip(self.vertices, self.slice_weights):
            out += weights * lattice[rows]
        return out.view_as(values)


def _pack(keys: Tensor) -> tuple[Tensor, list[int]]:
    """int64 codes of B x K x d integer keys, mixed radix with the set index as the top digit.

    Each digit leaves a margin of d+1 on both sides so that the neighbour keys (+-1 and +-d on a
    coordinate) are packed without carries. Returns the codes and each coordinate's place value.
    """
    batch_size, _, d = keys.shape
    margin = d + 1
    low = keys.amin(dim=(0, 1)) - margin
    spans = (keys.amax(dim=(0, 1)) - low + margin + 1).tolist()
    place_values = [math.prod(spans[i + 1:]) for i in range(d)]
    if batch_size * math.prod(spans) >= 2**63:
        raise ValueError(
            f"permutohedral lattice keys span {spans} per coordinate and do not fit in 64 bits: "
            "the kernel's standard deviations are too small for this image size")
    codes = torch.arange(batch_size, device=keys.device).view(-1, 1) * math.prod(spans)
    codes = codes + ((keys - low) * torch.tensor(place_values, device=keys.device)).sum(dim=-1)
    return codes, place_values


def _lookup(table: Tensor, queries: Tensor) -> Tensor:
    """1-based position of each query in the sorted `table`, or 0 where it is absent."""
    position = torch.searchsorted(table, queries)
    found = table[position.clamp(max=table.numel() - 1)] == queries
    return torch.where(found, position + 1, 0)
