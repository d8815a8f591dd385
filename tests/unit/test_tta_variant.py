"""A new test-time augmentation variant is one TTASettings subclass (or field) with its views:
configs, flags, the plan and the model stage pass the settings on whole, unchanged.

The variant here (vertical flip) is written in this file only; before TTASettings it took ~9
places (tta.py, SegmentConfig, InferencePlan, make_plan, ModelStage, TuneCRFConfig,
evaluate_model, two scripts' flags).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from deeplab_core.constants import CRFParams, TTASettings
from deeplab_core.synthetic import SyntheticSpec, render_scene
from deeplab_core.transforms import normalize
from deeplab_core.tta import predict
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.crf_tuning import TuneCRFConfig
from pipelines.segmentation.stages import IMAGE, PROBS, ModelStage
from pipelines.segmentation.stages.plan import InferencePlan

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _upside_down(x):
    return x.flip(-2)


@dataclasses.dataclass(frozen=True)
class VFlipTTA(TTASettings):
    """The trivial variant: also average the vertically mirrored view at every scale."""

    vflip: bool = True

    def views(self):
        return super().views() + ((_upside_down,) if self.vflip else ())


@pytest.fixture(scope="module")
def model():
    """A 'network' whose answer depends on which way up the image is (an asymmetric 5x5 conv)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 5, padding=2)
    with torch.no_grad():
        conv.weight.mul_(8)
    return conv.eval()


def test_the_configs_carry_the_variant_unchanged():
    variant = VFlipTTA(scales=(0.75, 1.0), flip=True)
    assert SegmentConfig(model="m", input="i", output="o", tta=variant).tta is variant
    assert TuneCRFConfig(model="m", manifest="x.parquet", tta=variant).tta is variant
    # Top-level keys of older configs still land in the (base) settings.
    legacy = SegmentConfig(model="m", input="i", output="o", scales=[1], flip=False, fusion="max")
    assert legacy.tta == TTASettings(scales=(1.0,), flip=False, fusion="max")
    assert not VFlipTTA(scales=(1.0,), flip=False).is_plain and TTASettings((1.0,), False).is_plain


def test_the_model_stage_runs_the_variant(model):
    image, _ = render_scene(SyntheticSpec(height=48, width=64), 3)
    tta = VFlipTTA(scales=(1.0,), flip=False)
    plan = InferencePlan(num_classes=6, mean=MEAN, std=STD, tta=tta, max_pixels=None, crf=True,
                         crf_params=CRFParams(iterations=1), crf_backend="pydensecrf", table=False, score=False,
                         overlays=False, max_input_pixels=10**7, storage_options=None)
    batch = {"id": np.array(["a"], dtype=object), "uri": np.array([""], dtype=object),
             "status": np.array(["ok"], dtype=object), "error_stage": np.array([""], dtype=object),
             "error_reason": np.array([""], dtype=object), "seconds_decode": np.zeros(1)}
    batch[IMAGE] = np.empty(1, dtype=object)
    batch[IMAGE][0] = image
    probs = ModelStage(model, plan, "cpu", 1)(batch)[PROBS][0].astype(np.float32)

    x = normalize(image, MEAN, STD)[None]
    with torch.inference_mode():
        upright = model(x).softmax(1)
        mirrored = model(x.flip(-2)).softmax(1).flip(-2)
    expected = ((upright + mirrored) / 2)[0].numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-3)  # float16 across the object store
    plain = predict(model, x, TTASettings(scales=(1.0,), flip=False))[0].numpy()
    assert np.abs(plain - expected).max() > 1e-2  # the variant really ran


def test_the_configs_know_which_tta_fields_were_given():
    """A registered version's recipe may fill the fields the user did not give."""
    from pipelines import segment

    args = segment.build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o", "--no-flip"])
    cfg = segment.config_from_args(args)
    assert cfg.tta_given == {"flip"} and cfg.model_copy(update={"crf": False}).tta_given == {"flip"}
    assert SegmentConfig(model="m", input="i", output="o", scales=[1]).tta_given == {"scales"}
    assert SegmentConfig(model="m", input="i", output="o").tta_given == frozenset()
    assert SegmentConfig(model="m", input="i", output="o", tta=VFlipTTA()).tta_given == {"scales", "flip", "fusion"}
