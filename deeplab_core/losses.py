"""Training losses: cross-entropy with ignore 255, optional aux head and bootstrapping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_core.constants import IGNORE_INDEX


def bootstrapped_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ratio: float,
                               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean loss over the hardest `ratio` of the valid pixels of each image (hard-pixel mining,
    as in the DeepLab Cityscapes recipes)."""
    pixel_loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    pixel_loss = pixel_loss.flatten(1)
    valid = (target != ignore_index).flatten(1)
    losses = []
    for loss_i, valid_i in zip(pixel_loss, valid):
        vals = loss_i[valid_i]
        if vals.numel() == 0:
            losses.append(loss_i.sum() * 0.0)
            continue
        k = max(1, int(round(ratio * vals.numel())))
        losses.append(vals.topk(k).values.mean())
    return torch.stack(losses).mean()


class SegmentationLoss(nn.Module):
    """Cross-entropy on the main logits (+ `aux_weight` x the aux logits when present).

    `bootstrap_ratio` (0, 1] switches to bootstrapped cross-entropy on the hardest pixels. Targets
    that are entirely `ignore_index` give a zero loss instead of NaN.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, aux_weight: float = 0.4,
                 bootstrap_ratio: float | None = None):
        super().__init__()
        if bootstrap_ratio is not None and not 0 < bootstrap_ratio <= 1:
            raise ValueError(f"bootstrap_ratio must be in (0, 1], got {bootstrap_ratio}")
        self.ignore_index, self.aux_weight, self.bootstrap_ratio = ignore_index, aux_weight, bootstrap_ratio

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.bootstrap_ratio is not None:
            return bootstrapped_cross_entropy(logits, target, self.bootstrap_ratio, self.ignore_index)
        if (target != self.ignore_index).any():
            return F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        return logits.sum() * 0.0

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, dict):
            loss = self._single(output["out"], target)
            if "aux" in output and self.aux_weight:
                loss = loss + self.aux_weight * self._single(output["aux"], target)
            return loss
        return self._single(output, target)
