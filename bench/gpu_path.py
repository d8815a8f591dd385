"""What the jobs run on a GPU, importable without Ray, pyarrow or MLflow (none fit on the GPU machine).

- `training_step`: one step as `pipelines/training/loop.py` runs it on a GPU - bf16 autocast,
  channels_last model and input, `SegmentationLoss`; that module imports ray at module level, so
  the step is restated here (tests/unit/test_gpu_path.py checks it against fp32).
- `model_stage_outputs`: what `pipelines/segmentation/stages.py: ModelStage` does to one same-size
  group of images (normalise, `predict_probs` with its default autocast - bf16 on CUDA -,
  probabilities to the host, argmax there). `stages.py` imports pyarrow (through pipelines.data
  and segmentation.io) and `ModelStage.__init__` imports ray, so it cannot be constructed on the
  GPU machine; the unit tests check this replica against `ModelStage` wherever ray is installed.
- `crf_on_device`: the torch dense CRF on the model's probabilities where they already are.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deeplab_core.constants import IMAGENET_MEAN, IMAGENET_STD, CRFParams
from deeplab_core.crf_torch import dense_crf_torch
from deeplab_core.losses import SegmentationLoss
from deeplab_core.transforms import normalize
from deeplab_core.tta import predict_probs


@dataclass(frozen=True)
class StepResult:
    loss: float
    # The classifier's (last conv's) weight gradient: at random initialisation the global norm is
    # dominated by near-zero BatchNorm-bias gradients whose bf16 rounding noise is as large as
    # they are; the classifier's gradient is the signal that bf16 has to keep.
    classifier_grad: torch.Tensor  # float32, on the CPU
    logits_dtype: torch.dtype
    channels_last: bool  # the model's first 4-D weight was channels_last during the step

    @property
    def grad_norm(self) -> float:
        return float(self.classifier_grad.norm())


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.ndim == 4]


def _first_conv_weight(model: nn.Module) -> torch.Tensor:
    return _conv_weights(model)[0]


def prepare_for_training(model: nn.Module, device: torch.device | str, channels_last: bool) -> nn.Module:
    model = model.to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def forward_backward(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, bf16: bool,
                     channels_last: bool, criterion: nn.Module) -> tuple[torch.Tensor, torch.dtype]:
    """Forward (bf16 autocast if asked) and backward as the training loop runs them; returns the
    loss (a device tensor, no synchronisation) and the logits' dtype."""
    device = _first_conv_weight(model).device
    images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        output = model(images)
        loss = criterion(output, masks)
    loss.backward()
    logits = output["out"] if isinstance(output, dict) else output
    return loss, logits.dtype


def train_iteration(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, optimizer: torch.optim.Optimizer,
                    *, bf16: bool, channels_last: bool, criterion: nn.Module) -> float:
    """One optimizer step, including the loop's per-step `loss.item()` (its one host sync)."""
    loss, _ = forward_backward(model, images, masks, bf16=bf16, channels_last=channels_last, criterion=criterion)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def training_step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, bf16: bool,
                  channels_last: bool, criterion: nn.Module | None = None) -> StepResult:
    """Forward and backward for comparisons: the gradients are kept, no update is made."""
    loss, dtype = forward_backward(model, images, masks, bf16=bf16, channels_last=channels_last,
                                   criterion=criterion or SegmentationLoss())
    classifier = _conv_weights(model)[-1]
    return StepResult(float(loss.detach()), classifier.grad.detach().float().cpu().clone(), dtype,
                      _first_conv_weight(model).is_contiguous(memory_format=torch.channels_last))


def synthetic_batch(batch: int, height: int, width: int, num_classes: int = 21,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images and integer masks (cost does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, height, width, generator=g),
            torch.randint(0, num_classes, (batch, height, width), generator=g))


@torch.no_grad()
def prime_batchnorm(model: nn.Module, images: torch.Tensor, passes: int = 3) -> nn.Module:
    """Running statistics from a few train-mode forwards, so that a randomly initialised deep
    model's eval-mode activations stay in range (initial statistics are mean 0, variance 1)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the passes
            module.reset_running_stats()
    for _ in range(passes):
        model(images)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return model.eval()


def model_stage_probs(model: nn.Module, images: Sequence[np.ndarray], scales: Sequence[float], flip: bool,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      fusion: str = "mean", max_pixels: int | None = None,
                      autocast: bool | None = None) -> torch.Tensor:
    """`ModelStage._probs`: uint8 HxWx3 images (one size) -> N x C x H x W probabilities on the
    model's device. `autocast=None` is the job's behaviour (bf16 on CUDA, fp32 on CPU)."""
    batch = torch.stack([normalize(img, mean, std) for img in images])
    return predict_probs(model, batch, scales=scales, flip=flip, fusion=fusion, max_pixels=max_pixels,
                         autocast=autocast)


def crf_on_device(images: Sequence[np.ndarray], probs: torch.Tensor, params: CRFParams) -> torch.Tensor:
    """Torch dense CRF on `probs.device` (the raw uint8 images travel there, N x H x W x 3)."""
    return dense_crf_torch(torch.from_numpy(np.stack(images)), probs, params=params)


def model_stage_outputs(model: nn.Module, images: Sequence[np.ndarray], scales: Sequence[float], flip: bool,
                        crf: CRFParams | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 N x H x W, probabilities float32 N x C x H x W) on the host, as `ModelStage`
    returns them (probabilities to the host, argmax there); with `crf`, refined on the device first."""
    probs = model_stage_probs(model, images, scales, flip, **options)
    if crf is not None:
        probs = crf_on_device(images, probs, crf)
    probs_np = probs.float().cpu().numpy()
    return probs_np.argmax(1).astype(np.uint8), probs_np


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def single_process_group(backend: str) -> Iterator[None]:
    """A world of one (rank 0) on a free local port, destroyed afterwards: what a 1-worker DDP
    job has, enough for SyncBatchNorm (nccl) or the loop's all-reduces (gloo)."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
