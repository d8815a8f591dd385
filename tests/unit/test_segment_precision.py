"""The CPU model stage's number formats (pipelines/segmentation/precision.py): channels_last
keeps fp32's labels; --precision maps to predict's autocast."""

from __future__ import annotations

import copy

import numpy as np
import torch

from deeplab_core.transforms import normalize
from deeplab_core.tta import predict_probs
from pipelines.segmentation import precision
from pipelines.segmentation.stages import IMAGE, LABEL, ModelStage
from deeplab_core import build_model
from tests.unit.test_segment_stages import decoded_batch, plan_for


def test_precision_settings_map_to_autocast():
    assert precision.autocast_for("fp32", gpu=False) is False
    assert precision.autocast_for("fp32", gpu=True) is False
    assert precision.autocast_for("bf16", gpu=False) is True
    assert precision.autocast_for("auto", gpu=True) is None  # CUDA's own bf16 default
    assert precision.autocast_for("auto", gpu=False) is (precision.AUTO_CPU_BF16 and precision.cpu_has_native_bf16())


def test_cpu_model_stage_runs_channels_last_with_fp32_labels():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=6, width_mult=0.25).eval()
    reference = copy.deepcopy(model)  # contiguous; the stage converts its own model in place
    plan = plan_for("pydensecrf")
    stage = ModelStage(model, plan, "cpu", 1)
    conv = next(p for p in stage.model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = decoded_batch()
    out = stage(batch)
    for i, image in enumerate(batch[IMAGE]):
        x = normalize(image, plan.mean, plan.std)[None]
        expected = predict_probs(reference, x, scales=plan.tta.scales, flip=plan.tta.flip, autocast=False)[0].argmax(0)
        assert np.array_equal(out[LABEL][i], expected.numpy().astype(np.uint8))
