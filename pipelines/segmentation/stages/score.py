"""Score stage (CPU tasks, only with ground-truth masks): one confusion matrix per image and
variant, from the label columns the model and CRF stages leave: cm_plain / cm_tta / cm_crf for the
evaluation table, cm for the output masks (evaluate_model). The labels and masks stop here."""

from __future__ import annotations

import numpy as np

from pipelines.segmentation.columns import (
    CM,
    CM_CRF,
    CM_PLAIN,
    CM_TTA,
    GT,
    HAS_GT,
    ID,
    LABEL,
    LABEL_CRF,
    LABEL_PLAIN,
    LABEL_TTA,
    STATUS,
    STATUS_OK,
)
from pipelines.segmentation.poison import guarded
from pipelines.segmentation.stages.plan import InferencePlan
from pipelines.segmentation.stages.write import WriteSpec, write_stage


def score_stage(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    return guarded(plan.guard, "score", batch, lambda b: _score(b, plan))


def score_then_write(batch: dict[str, np.ndarray], plan: InferencePlan,
                     write: WriteSpec | None = None) -> dict[str, np.ndarray]:
    """The end of the stream in the task that has the labels (the CRF task, else a 0-CPU task):
    scored with ground truth, then written with a spec, as soon as they exist."""
    if plan.with_masks:
        batch = score_stage(batch, plan)
    return batch if write is None else write_stage(batch, write)


def scored_columns(plan: InferencePlan) -> dict[str, str]:
    """confusion-matrix column -> the label column it scores."""
    columns = {CM_PLAIN: LABEL_PLAIN, CM_TTA: LABEL_TTA, CM_CRF: LABEL_CRF} if plan.table else {}
    if plan.score:
        columns[CM] = LABEL
    return columns


def _score(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    from deeplab_core.metrics import confusion_matrix

    n, k = len(batch[ID]), plan.num_classes
    scored = [i for i in range(n) if batch[STATUS][i] == STATUS_OK and batch[HAS_GT][i]]
    out = {name: v for name, v in batch.items() if name not in (GT, LABEL_PLAIN, LABEL_TTA, LABEL_CRF)}
    for cm_name, label_name in scored_columns(plan).items():
        cms = np.zeros((n, k, k), np.int64)
        for i in scored:  # writable copies for torch
            cms[i] = confusion_matrix(np.array(batch[label_name][i]), np.array(batch[GT][i]), k)
        out[cm_name] = cms
    return out
