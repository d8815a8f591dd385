"""The segmentation stages without Ray: the torch CRF inside the model actor gives the masks and
confusion matrices the pydensecrf CRF stage gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplab_core import build_model
from deeplab_core.constants import CRFParams
from deeplab_core.synthetic import SyntheticSpec, render_scene
from deeplab_core.constants import TTASettings
from deeplab_core.crf import choose_backend
from pipelines.segmentation.stages import (
    CM_CRF,
    CM_TTA,
    GT,
    HAS_GT,
    IMAGE,
    LABEL,
    PROBS,
    InferencePlan,
    ModelStage,
    crf_stage,
    score_stage,
)


def plan_for(backend: str) -> InferencePlan:
    return InferencePlan(num_classes=6, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         tta=TTASettings(scales=(0.75, 1.0), flip=True), max_pixels=None, crf=True,
                         crf_params=CRFParams(iterations=5), crf_backend=backend, table=True, score=False,
                         overlays=False, max_input_pixels=10**7, storage_options=None)


def decoded_batch(n: int = 3) -> dict[str, np.ndarray]:
    scenes = [render_scene(SyntheticSpec(height=48, width=64), seed) for seed in range(n)]
    batch = {"id": np.array([f"s{i}" for i in range(n)], dtype=object),
             "uri": np.array([f"mem://s{i}.png" for i in range(n)], dtype=object),
             "status": np.array(["ok"] * n, dtype=object), "error_stage": np.array([""] * n, dtype=object),
             "error_reason": np.array([""] * n, dtype=object), "seconds_decode": np.zeros(n),
             HAS_GT: np.ones(n, bool)}
    batch[IMAGE] = np.empty(n, dtype=object)
    batch[GT] = np.empty(n, dtype=object)
    for i, (image, mask) in enumerate(scenes):
        batch[IMAGE][i], batch[GT][i] = image, mask
    return batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=6, width_mult=0.25).eval()


def test_auto_backend_is_torch_on_gpu_and_pydensecrf_on_cpu():
    assert choose_backend("auto", on_gpu=True) == "torch"
    assert choose_backend("auto", on_gpu=False) == "pydensecrf"
    assert choose_backend("torch", on_gpu=False) == "torch"


def test_torch_crf_in_the_model_actor_matches_the_pydensecrf_stage(model):
    torch_model_out = ModelStage(model, plan_for("torch"), "cpu", 1)(decoded_batch())
    assert PROBS not in torch_model_out  # probabilities never leave the actor
    torch_out = score_stage(torch_model_out, plan_for("torch"))
    # The CRF task scores its batch itself (and writes it, given a spec): no score stage follows.
    pydense_out = crf_stage(ModelStage(model, plan_for("pydensecrf"), "cpu", 1)(decoded_batch()),
                            plan_for("pydensecrf"))
    torch_labels = np.stack(list(torch_out[LABEL]))
    pydense_labels = np.stack(list(pydense_out[LABEL]))
    # pydensecrf gets float16 probabilities across the object store; the torch path float32.
    assert (torch_labels == pydense_labels).mean() >= 0.99
    assert np.array_equal(torch_out[CM_TTA], pydense_out[CM_TTA])
    correct = [int(np.trace(out[CM_CRF].sum(0))) for out in (torch_out, pydense_out)]
    assert correct[0] > 0 and abs(correct[0] - correct[1]) <= 0.01 * torch_labels.size
    assert list(torch_out["status"]) == ["ok"] * 3 and (torch_out["seconds_crf"] > 0).all()
