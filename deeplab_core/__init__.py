"""deeplab_core: the DeepLab family (v1, v2, v3, v3+) in pure PyTorch.

Models, transforms, losses, metrics, the poly LR schedule, test-time augmentation and dense CRF.
Nothing here imports Ray or MLflow, so every piece runs and tests with torch and numpy alone.
"""

from __future__ import annotations

import importlib

# Public names -> defining module. Imported lazily so that `import deeplab_core` stays cheap and
# optional dependencies (pydensecrf) are only needed by code that uses them.
_EXPORTS = {
    "build_model": "deeplab_core.models",
    "param_groups": "deeplab_core.models",
    "TrainTransform": "deeplab_core.transforms",
    "EvalTransform": "deeplab_core.transforms",
    "predict_probs": "deeplab_core.tta",
    "dense_crf": "deeplab_core.crf",
    "confusion_matrix": "deeplab_core.metrics",
    "segmentation_metrics": "deeplab_core.metrics",
    "poly_lr": "deeplab_core.lr_schedule",
    "PolyLRScheduler": "deeplab_core.lr_schedule",
    "SegmentationLoss": "deeplab_core.losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deeplab_core' has no attribute {name!r}")
