"""The named columns the segmentation stages pass on, and the small helpers every stage uses on
them. A leaf module (numpy only), so the stages, the poison guard and the driver agree on names.

    decode  id, uri, mask_uri -> + image, [gt, has_gt], status, seconds_decode
    model   -> + label, [probs], [label_plain, label_tta], seconds_model
    crf     -> label refined (when the masks are CRF-refined), [label_crf], seconds_crf
    score   label_* + gt -> [cm_plain, cm_tta, cm_crf | cm]; the label_* columns dropped
    write   masks, overlays; -> + output_uri, overlay_uri, classes, finished_at; pixels dropped
"""

from __future__ import annotations

import numpy as np

from pipelines.data.rows import object_array  # noqa: F401 - the stages take it from here
from pipelines.segmentation.io import STATUS_ERROR, STATUS_OK

# Always present: ID .. SECONDS_DECODE. The others as the plan says.
ID, URI, MASK_URI = "id", "uri", "mask_uri"
STATUS, ERROR_STAGE, ERROR_REASON = "status", "error_stage", "error_reason"
IMAGE, GT, HAS_GT, PROBS, LABEL = "image", "gt", "has_gt", "probs", "label"
# The evaluation table's labels per variant, for the score stage (label = the output mask's).
LABEL_PLAIN, LABEL_TTA, LABEL_CRF = "label_plain", "label_tta", "label_crf"
SECONDS_DECODE, SECONDS_MODEL, SECONDS_CRF = "seconds_decode", "seconds_model", "seconds_crf"
CM_PLAIN, CM_TTA, CM_CRF, CM = "cm_plain", "cm_tta", "cm_crf", "cm"  # confusion matrices per image
# classes: the class ids present in the mask, comma-separated; finished_at: POSIX seconds
OUTPUT_URI, OVERLAY_URI, CLASSES, FINISHED_AT = "output_uri", "overlay_uri", "classes", "finished_at"
WRITE_COLUMNS = (ERROR_REASON, OUTPUT_URI, OVERLAY_URI, CLASSES, FINISHED_AT)  # what write adds for the driver
STATUS_COLUMNS = (STATUS, ERROR_STAGE, ERROR_REASON)


def placeholder_image() -> np.ndarray:
    return np.zeros((1, 1, 3), np.uint8)


def placeholder_mask() -> np.ndarray:
    return np.zeros((1, 1), np.uint8)


def initial_status(n: int) -> dict[str, np.ndarray]:
    return {STATUS: np.full(n, STATUS_OK, dtype=object), ERROR_STAGE: np.full(n, "", dtype=object),
            ERROR_REASON: np.full(n, "", dtype=object)}


def writable_status(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of the status columns that stages may update (zero-copy batches are read-only)."""
    for name in STATUS_COLUMNS:
        batch[name] = np.array(batch[name], dtype=object)
    return batch


def mark_error(batch: dict, i: int, stage: str, reason: str) -> None:
    batch[STATUS][i] = STATUS_ERROR
    batch[ERROR_STAGE][i] = stage
    batch[ERROR_REASON][i] = reason[:500]
