"""CRF stage: dense CRF on the model's probabilities through `deeplab_core.crf.refine`, as CPU
tasks (pydensecrf holds the GIL: separate processes) or, for the torch backend, inside the model
actor (`refine_group`). -> label refined when the masks are CRF-refined, [label_crf], seconds_crf."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from pipelines.segmentation.columns import (
    ID,
    IMAGE,
    LABEL,
    LABEL_CRF,
    PROBS,
    SECONDS_CRF,
    STATUS,
    STATUS_OK,
    mark_error,
    object_array,
    placeholder_mask,
    writable_status,
)
from pipelines.segmentation.poison import guarded
from pipelines.segmentation.stages.plan import InferencePlan
from pipelines.segmentation.stages.score import score_then_write
from pipelines.segmentation.stages.write import WriteSpec


def crf_stage(batch: dict[str, np.ndarray], plan: InferencePlan,
              write: WriteSpec | None = None) -> dict[str, np.ndarray]:
    """Dense CRF, one image at a time (an image that fails is that image's error); the refined
    batch is scored (with ground truth) and, with `write`, written by this same task, as soon as
    the masks exist."""
    return score_then_write(guarded(plan.guard, "crf", batch, lambda b: _crf(b, plan)), plan, write)


def _crf(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    from deeplab_core.crf import refine

    batch = writable_status(dict(batch))
    n = len(batch[ID])
    crf_labels: list[np.ndarray | None] = [None] * n
    seconds = np.zeros(n)
    for i in range(n):
        if batch[STATUS][i] != STATUS_OK:
            continue
        start = time.perf_counter()
        try:
            crf_labels[i] = refine([batch[IMAGE][i]], [batch[PROBS][i]], plan.crf_params, plan.crf_backend)[0]
        except Exception as err:  # noqa: BLE001
            mark_error(batch, i, "crf", f"{type(err).__name__}: {err}")
            continue
        seconds[i] = time.perf_counter() - start
    return with_crf_labels(batch, plan, crf_labels, seconds)


def refine_group(batch: dict, group: list[int], images: list[np.ndarray], probs, plan: InferencePlan,
                 crf_labels: list, crf_seconds: np.ndarray) -> None:
    """The torch dense CRF on the probabilities' device, batched over a group of same-size images."""
    from deeplab_core.crf import refine

    start = time.perf_counter()
    try:
        crf_np = refine(images, probs, plan.crf_params, backend="torch")
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: these images fail, not the job
        for i in group:
            mark_error(batch, i, "crf", f"{type(err).__name__}: {err}")
        return
    elapsed = (time.perf_counter() - start) / len(group)
    for j, i in enumerate(group):
        crf_labels[i], crf_seconds[i] = crf_np[j], elapsed


def with_crf_labels(batch: dict[str, np.ndarray], plan: InferencePlan, crf_labels: Sequence[np.ndarray | None],
                    seconds: np.ndarray) -> dict[str, np.ndarray]:
    """The CRF's output columns, whichever backend refined: the output label is the CRF's when
    ``plan.crf``; the CRF label itself for the evaluation table."""
    labels = list(batch[LABEL])
    table_labels = [placeholder_mask()] * len(labels)
    for i, crf_label in enumerate(crf_labels):
        if crf_label is None or batch[STATUS][i] != STATUS_OK:
            continue
        if plan.crf:
            labels[i] = crf_label
        table_labels[i] = crf_label
    out = {k: v for k, v in batch.items() if k not in (PROBS, IMAGE)}
    out.update({LABEL: object_array(labels), SECONDS_CRF: seconds})
    if plan.table:
        out[LABEL_CRF] = object_array(table_labels)
    if plan.overlays:
        out[IMAGE] = batch[IMAGE]
    return out
