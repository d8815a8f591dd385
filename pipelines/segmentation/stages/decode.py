"""Decode stage (CPU tasks): reads and decodes each batch's images (and ground-truth masks when
scoring) with the row decoder training uses; a bad input becomes an error row, never a crash."""

from __future__ import annotations

import time

import numpy as np

from pipelines.data.rows import RowDecoder
from pipelines.segmentation.columns import (
    GT,
    HAS_GT,
    ID,
    IMAGE,
    MASK_URI,
    SECONDS_DECODE,
    STATUS,
    STATUS_COLUMNS,
    STATUS_OK,
    URI,
    initial_status,
    mark_error,
    object_array,
    placeholder_image,
    placeholder_mask,
)
from pipelines.segmentation.poison import guarded
from pipelines.segmentation.stages.plan import InferencePlan


def decode_stage(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    """id, uri, mask_uri -> + image, [gt, has_gt], status, seconds_decode."""
    return guarded(plan.guard, "decode", batch, lambda b: _decode(b, plan))


def _decode(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    n = len(batch[ID])
    start = time.perf_counter()
    out = {ID: batch[ID], URI: batch[URI], **initial_status(n)}
    if STATUS in batch:  # rows may arrive as errors already (an input the guard gave up on)
        out.update({name: np.array(batch[name], dtype=object) for name in STATUS_COLUMNS})
    todo = [i for i in range(n) if out[STATUS][i] == STATUS_OK]
    decoder = RowDecoder(plan.storage_options, plan.num_classes, plan.max_input_pixels,
                         require_masks=False, read_masks=plan.with_masks)
    mask_uris = [batch[MASK_URI][i] for i in todo] if plan.with_masks else None
    decoded = [None] * n
    for i, row in zip(todo, decoder.decode_rows([batch[ID][i] for i in todo], [batch[URI][i] for i in todo],
                                                mask_uris)):
        decoded[i] = row
    images, masks, has_gt = [], [], np.zeros(n, bool)
    for i, row in enumerate(decoded):
        if row is not None and row.error is not None:
            mark_error(out, i, row.error.stage, row.error.reason)
        ok = row is not None and row.error is None
        images.append(row.image if ok else placeholder_image())
        has_gt[i] = ok and row.mask is not None
        masks.append(row.mask if has_gt[i] else placeholder_mask())
    # Files of a batch are fetched concurrently: each image is charged an equal share.
    out.update({IMAGE: object_array(images), SECONDS_DECODE: np.full(n, (time.perf_counter() - start) / max(n, 1))})
    if plan.with_masks:
        out.update({GT: object_array(masks), HAS_GT: has_gt})
    return out
