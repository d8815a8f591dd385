"""Write stage (CPU tasks): masks (VOC palette PNG) and overlays written atomically; the driver
records each outcome once the batch reaches it (ledger.py). -> + output_uri, overlay_uri, classes,
finished_at; pixels dropped."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipelines.common.redaction import scrub
from pipelines.data.storage import resolve_storage_options
from pipelines.segmentation.columns import (
    CLASSES,
    FINISHED_AT,
    GT,
    ID,
    IMAGE,
    LABEL,
    OUTPUT_URI,
    OVERLAY_URI,
    PROBS,
    STATUS,
    STATUS_OK,
    URI,
    mark_error,
    writable_status,
)
from pipelines.segmentation.io import OutputLayout, write_atomically
from pipelines.segmentation.poison import Guard, guarded


def _error_reason(err: BaseException, uri: str, storage_options) -> str:
    """The error as text, with any credential of the storage options scrubbed out."""
    return scrub(f"{type(err).__name__}: {err}", resolve_storage_options(uri, storage_options))


@dataclass(frozen=True)
class WriteSpec:
    output: str
    run_id: str
    model_uri: str
    crf: bool
    overlays: bool
    overlay_alpha: float
    storage_options: Mapping[str, Any] | None
    crf_backend: str | None = None  # recorded per image
    crf_source: str | None = None  # results columns `crf_source` / `crf_params` (JSON) when crf
    crf_params: str | None = None
    guard: Guard | None = None


def _png_bytes(label: np.ndarray) -> bytes:
    from deeplab_core.palette import colorize

    buffer = io.BytesIO()
    colorize(label).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(image: np.ndarray, label: np.ndarray, alpha: float) -> bytes:
    import cv2

    from deeplab_core.palette import overlay

    blended = overlay(image, label, alpha)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(blended, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def write_stage(batch: dict[str, np.ndarray], spec: WriteSpec) -> dict[str, np.ndarray]:
    """Writes masks (and overlays); the driver records each outcome once this batch reaches it."""
    return guarded(spec.guard, "write", batch, lambda b: _write(b, spec))


def _write(batch: dict[str, np.ndarray], spec: WriteSpec) -> dict[str, np.ndarray]:
    layout = OutputLayout(spec.output)
    n = len(batch[ID])
    batch = writable_status(dict(batch))
    # "" for none: a column of only None would reach the driver as float NaNs
    mask_uris, overlay_uris, classes = [""] * n, [""] * n, [""] * n
    for i in range(n):
        if batch[STATUS][i] != STATUS_OK:
            continue
        record_id, label = str(batch[ID][i]), batch[LABEL][i]
        try:
            mask_uri = layout.mask_uri(record_id)
            write_atomically(mask_uri, _png_bytes(label), spec.storage_options)
            if spec.overlays:
                overlay_uri = layout.overlay_uri(record_id)
                data = _jpeg_bytes(batch[IMAGE][i], label, spec.overlay_alpha)
                write_atomically(overlay_uri, data, spec.storage_options)
                overlay_uris[i] = overlay_uri
            mask_uris[i] = mask_uri
            classes[i] = ",".join(map(str, np.flatnonzero(np.bincount(label.ravel(), minlength=1))))
        except Exception as err:  # noqa: BLE001
            mark_error(batch, i, "write", _error_reason(err, spec.output, spec.storage_options))
            mask_uris[i] = overlay_uris[i] = ""
    out = {k: v for k, v in batch.items() if k not in (IMAGE, LABEL, URI, PROBS, GT)}
    now = datetime.now(timezone.utc).timestamp()
    out.update({OUTPUT_URI: np.array(mask_uris, dtype=object), OVERLAY_URI: np.array(overlay_uris, dtype=object),
                CLASSES: np.array(classes, dtype=object), FINISHED_AT: np.full(n, now)})
    return out
