"""The DeepLab "poly" learning-rate policy, per iteration, with optional linear warm-up."""

from __future__ import annotations

import torch


def poly_lr(it: int, max_it: int, base_lr: float, power: float = 0.9,
            warmup_iters: int = 0, warmup_factor: float = 0.1) -> float:
    """`base_lr * (1 - it / max_it) ** power`; during warm-up the factor ramps linearly from
    `warmup_factor` to 1 (multiplied with the poly factor, as in detectron2's WarmupPolyLR)."""
    if max_it <= 0:
        raise ValueError(f"max_it must be positive, got {max_it}")
    if not 0 <= it <= max_it:
        raise ValueError(f"iteration {it} outside [0, {max_it}]")
    factor = (1.0 - it / max_it) ** power
    if it < warmup_iters:
        alpha = it / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return base_lr * factor


class PolyLRScheduler(torch.optim.lr_scheduler.LambdaLR):
    """Poly schedule for every param group (each keeps its own base LR, e.g. the head's x10).

    Step it once per iteration. Its state_dict holds the iteration count, so resuming from a
    checkpoint continues the curve where it stopped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_it: int, power: float = 0.9,
                 warmup_iters: int = 0, warmup_factor: float = 0.1, last_epoch: int = -1):
        self.max_it, self.power = max_it, power
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, it: int) -> float:
        return poly_lr(min(it, self.max_it), self.max_it, 1.0, self.power,
                       self.warmup_iters, self.warmup_factor)
