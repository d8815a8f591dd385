"""The GPU path of training and batch segmentation, on every device this machine has.

cpu always (tiny models, so CI runs these), cuda when available (ResNet-101 models at small crops).
`bench/gpu_suite.py` runs this file on the GPU machine and records each outcome. Only torch,
deeplab_core and (for the CRF) pydensecrf are needed; the one ModelStage test needs ray + pyarrow
and is skipped where they are missing (the GPU machine).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from bench.gpu_path import (
    crf_on_device,
    model_stage_outputs,
    model_stage_probs,
    prepare_for_training,
    prime_batchnorm,
    single_process_group,
    synthetic_batch,
    training_step,
)
from deeplab_core.constants import CRFParams
from deeplab_core.models import build_model
from deeplab_core.synthetic import SyntheticSpec, render_scene

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class Setup:
    backbone: str
    crop: int
    batch: int
    image_hw: tuple[int, int]  # segmentation inputs (H, W)
    crf_whc: tuple[int, int, int]  # CRF inputs (W, H, classes)
    opts: dict = field(default_factory=dict)

    def model(self, arch: str = "deeplabv3plus", num_classes: int = 21) -> nn.Module:
        torch.manual_seed(0)
        return build_model(arch, self.backbone, num_classes=num_classes, output_stride=16, **self.opts)


SETUPS = {
    "cpu": Setup("mobilenetv2", crop=65, batch=2, image_hw=(48, 64), crf_whc=(80, 60, 5), opts={"width_mult": 0.25}),
    "cuda": Setup("resnet101", crop=129, batch=4, image_hw=(375, 500), crf_whc=(500, 375, 21)),
}
# bf16 keeps 8 mantissa bits (~0.4 % per rounding). Measured on CPU over 3 seeds x {v3, v3+} x
# {MobileNetV2 x0.25, ResNet-18} at 65x65: loss within 0.12 %, classifier gradient norm within
# 3.5 %, its cosine to fp32's >= 0.95. The bounds leave ~2x margin (gradients) and ~8x (loss).
LOSS_RTOL, GRAD_RTOL, GRAD_MIN_COSINE = 0.01, 0.08, 0.9


@pytest.fixture(autouse=True)
def one_torch_thread_and_true_fp32():
    """2 shared cores: one thread avoids OpenMP threads waiting on each other. On CUDA, fp32
    references are fp32: cuDNN would otherwise run fp32 convolutions in TF32."""
    threads, tf32 = torch.get_num_threads(), torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_num_threads(threads)
    torch.backends.cudnn.allow_tf32 = tf32


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _images(setup: Setup, count: int) -> list[np.ndarray]:
    height, width = setup.image_hw
    return [render_scene(SyntheticSpec(height=height, width=width), seed)[0] for seed in range(count)]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_channels_last_step_matches_fp32(device: str) -> None:
    setup = SETUPS[device]
    images, masks = synthetic_batch(setup.batch, setup.crop, setup.crop)
    reference = prepare_for_training(setup.model(), device, channels_last=False)
    mixed = prepare_for_training(copy.deepcopy(reference), device, channels_last=True)
    fp32 = training_step(reference, images, masks, bf16=False, channels_last=False)
    bf16 = training_step(mixed, images, masks, bf16=True, channels_last=True)
    assert fp32.logits_dtype == torch.float32 and not fp32.channels_last
    assert bf16.logits_dtype == torch.bfloat16 and bf16.channels_last  # the mixed path really ran
    assert bf16.loss != fp32.loss  # bitwise equal would mean autocast did nothing
    assert _relative(bf16.loss, fp32.loss) < LOSS_RTOL, (bf16.loss, fp32.loss)
    assert np.isfinite(bf16.grad_norm) and bf16.grad_norm > 0
    assert _relative(bf16.grad_norm, fp32.grad_norm) < GRAD_RTOL, (bf16.grad_norm, fp32.grad_norm)
    cosine = torch.nn.functional.cosine_similarity(bf16.classifier_grad.flatten(), fp32.classifier_grad.flatten(), 0)
    assert cosine > GRAD_MIN_COSINE, float(cosine)


@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_in_a_one_process_group(device: str) -> None:
    """cuda: SyncBatchNorm under NCCL equals plain BatchNorm in a world of one (forward, gradients,
    running statistics). cpu: gloo and plain BatchNorm - SyncBatchNorm needs CUDA, which is why
    the training loop only converts on GPU - plus the loop's all-reduce."""
    setup = SETUPS[device]
    images, masks = synthetic_batch(setup.batch, setup.crop, setup.crop)
    plain = prepare_for_training(setup.model(), device, channels_last=False)
    with single_process_group("nccl" if device == "cuda" else "gloo"):
        total = torch.ones(3, device=device)
        torch.distributed.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
        if device != "cuda":
            with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
                nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).train()(images)
            step = training_step(plain, images, masks, bf16=False, channels_last=False)
            assert np.isfinite(step.loss) and step.grad_norm > 0
            return
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
        a = training_step(plain, images, masks, bf16=False, channels_last=False)
        b = training_step(synced, images, masks, bf16=False, channels_last=False)
    assert _relative(b.loss, a.loss) < 1e-4 and _relative(b.grad_norm, a.grad_norm) < 1e-3
    bn_plain = [m.running_var for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_synced = [m.running_var for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(bn_plain) == len(bn_synced) > 0
    assert all(torch.allclose(x, y, rtol=1e-3, atol=1e-5) for x, y in zip(bn_plain, bn_synced))


@pytest.mark.parametrize("device", DEVICES)
def test_model_stage_bf16_matches_fp32(device: str) -> None:
    """The model stage's TTA forward in bf16 autocast (the job's default on CUDA) gives fp32's
    probabilities to bf16 rounding, and its labels wherever fp32 is not near a tie. (A random
    model's top two probabilities are often within bf16 noise: measured on CPU, all labels agree
    only on 73-97 % of pixels, but on all of the 10 % with the largest top-2 margin, and
    probabilities differ by at most 0.06.)"""
    setup = SETUPS[device]
    images = _images(setup, 2)
    model = prime_batchnorm(setup.model().to(device), synthetic_batch(4, *setup.image_hw)[0].to(device))
    scales = (0.75, 1.0)
    fp32 = model_stage_probs(model, images, scales, flip=True, autocast=False)
    bf16 = model_stage_probs(model, images, scales, flip=True, autocast=True)
    assert fp32.shape == bf16.shape == (2, 21, *setup.image_hw) and bf16.dtype == torch.float32
    assert torch.allclose(bf16.sum(1), torch.ones_like(bf16[:, 0]), atol=1e-4)
    assert not torch.equal(bf16, fp32)  # autocast was on
    assert (bf16 - fp32).abs().max().item() < 0.1
    top2 = fp32.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    confident = margin >= margin.flatten().quantile(0.9)
    agree = (bf16.argmax(1) == fp32.argmax(1))[confident].float().mean().item()
    assert agree > 0.99, agree
    if device == "cuda":  # what the job runs there, autocast left to predict_probs, is the bf16 result
        default = model_stage_probs(model, images, scales, flip=True)
        assert (default - bf16).abs().max().item() < 1e-4 < (default - fp32).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_model_stage_replica_matches_job_stage(device: str) -> None:
    """bench/gpu_path.model_stage_outputs is what ModelStage computes (where ray and pyarrow exist)."""
    pytest.importorskip("pyarrow", reason="pyarrow not installed (GPU machine): checked where it is")
    pytest.importorskip("ray", reason="ray not installed (GPU machine): checked where it is")
    from deeplab_core.constants import IMAGENET_MEAN, IMAGENET_STD, TTASettings
    from pipelines.segmentation import stages

    setup = SETUPS[device]
    images = _images(setup, 2)
    model = prime_batchnorm(setup.model().to(device), synthetic_batch(4, *setup.image_hw)[0].to(device))
    plan = stages.InferencePlan(num_classes=21, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                tta=TTASettings(scales=(0.5, 1.0), flip=True), max_pixels=None, crf=True, crf_params=CRFParams(), crf_backend="pydensecrf", table=False,
                                score=False, overlays=False, max_input_pixels=10**8, storage_options=None)
    n = len(images)
    batch = {stages.ID: np.array(["a", "b"], dtype=object), stages.URI: np.array(["", ""], dtype=object),
             stages.STATUS: np.array(["ok"] * n, dtype=object), stages.ERROR_STAGE: np.array([""] * n, dtype=object),
             stages.ERROR_REASON: np.array([""] * n, dtype=object), stages.SECONDS_DECODE: np.zeros(n),
             stages.IMAGE: stages.object_array(images)}
    out = stages.ModelStage(model, plan, device, num_threads=1)(batch)
    labels, probs = model_stage_outputs(model, images, plan.tta.scales, plan.tta.flip)
    assert list(out[stages.STATUS]) == ["ok", "ok"]
    for i in range(n):
        np.testing.assert_array_equal(out[stages.LABEL][i], labels[i])
        np.testing.assert_allclose(out[stages.PROBS][i], probs[i].astype(np.float16), atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_crf_matches_pydensecrf(device: str) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    from bench.crf import Size, make_inputs
    from deeplab_core.crf import dense_crf

    width, height, classes = SETUPS[device].crf_whc
    image, probs = make_inputs(Size(width, height, classes))
    params = CRFParams(iterations=5)
    reference = dense_crf(image, probs, backend="pydensecrf", params=params)
    refined = crf_on_device([image], torch.from_numpy(probs)[None].to(device), params)
    assert refined.device.type == device
    refined = refined[0].cpu().numpy()
    agree = float((refined.argmax(0) == reference.argmax(0)).mean())
    assert agree > 0.999, agree
    assert float(np.abs(refined - reference).max()) < 1e-3
    assert float((reference.argmax(0) == probs.argmax(0)).mean()) < 0.999  # the CRF did change labels
