"""The Ray Data stages of batch segmentation (run on workers), and the columns they pass on.

    decode  (CPU tasks)   id, uri, mask_uri -> + image, [gt, has_gt], status, seconds_decode
    model   (actor pool)  -> + label, [probs], [cm_plain, cm_tta | cm], seconds_model
    crf     (CPU tasks)   -> label refined, [cm_crf | cm], seconds_crf   (pydensecrf holds the GIL)
    write   (in the CRF task, else 0-CPU tasks)  masks, overlays; -> + output_uri, overlay_uri,
                          classes; pixels dropped (the driver records the outcome: ledger.py)

Every stage runs its batch under poison.guarded: an input that kills its worker process ends as
an error row of that stage instead of making Ray retry it without end.

Which optional columns exist is decided once per run by the `InferencePlan`; the column names
are the constants below, so every stage and the driver agree on them.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from deeplab_core.constants import IMAGENET_MEAN, IMAGENET_STD, CRFParams
from pipelines.data.rows import RowDecoder
from pipelines.data.storage import resolve_storage_options, scrub
from pipelines.segmentation.io import (
    STATUS_ERROR,
    STATUS_OK,
    OutputLayout,
    write_atomically,
)
from pipelines.segmentation.poison import Guard, guarded

# Columns. Always present: ID .. SECONDS_DECODE. The others as the plan says.
ID, URI, MASK_URI = "id", "uri", "mask_uri"
STATUS, ERROR_STAGE, ERROR_REASON = "status", "error_stage", "error_reason"
IMAGE, GT, HAS_GT, PROBS, LABEL = "image", "gt", "has_gt", "probs", "label"
SECONDS_DECODE, SECONDS_MODEL, SECONDS_CRF = "seconds_decode", "seconds_model", "seconds_crf"
CM_PLAIN, CM_TTA, CM_CRF, CM = "cm_plain", "cm_tta", "cm_crf", "cm"  # confusion matrices per image
# classes: the class ids present in the mask, comma-separated; finished_at: POSIX seconds
OUTPUT_URI, OVERLAY_URI, CLASSES, FINISHED_AT = "output_uri", "overlay_uri", "classes", "finished_at"
WRITE_COLUMNS = (ERROR_REASON, OUTPUT_URI, OVERLAY_URI, CLASSES, FINISHED_AT)  # what write adds for the driver
STATUS_COLUMNS = (STATUS, ERROR_STAGE, ERROR_REASON)


@dataclass(frozen=True)
class InferencePlan:
    """What the workers compute; derived from the config, identical for every batch of a run."""

    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scales: tuple[float, ...]
    flip: bool
    fusion: str
    max_pixels: int | None
    crf: bool  # the output masks are CRF-refined
    crf_params: CRFParams
    crf_backend: str  # "pydensecrf" (CPU tasks after the model) or "torch" (inside the model actor)
    table: bool  # evaluation table: confusion matrices for plain, +MS+flip, +CRF
    score: bool  # one confusion matrix for the output masks (evaluate_model)
    overlays: bool
    max_input_pixels: int
    storage_options: Mapping[str, Any] | None
    guard: Guard | None = None  # worker deaths per batch/input (None: Ray's own retries only)
    autocast: bool | None = None  # bf16 autocast of the forwards (precision.py); None: on for CUDA only

    @property
    def run_crf(self) -> bool:
        return self.crf or self.table

    @property
    def with_masks(self) -> bool:
        return self.table or self.score

    @property
    def crf_in_model(self) -> bool:
        return self.run_crf and self.crf_backend == "torch"


def num_classes_of(model) -> int:
    config = getattr(model, "config", None) or {}
    if "num_classes" in config:
        return int(config["num_classes"])
    import torch

    with torch.inference_mode():  # a model without .config: ask it
        return int(model.eval()(torch.zeros(1, 3, 64, 64)).shape[1])


def normalisation_of(meta: Mapping[str, Any], model=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation a model was trained with: the checkpoint's meta, else the model's
    own (`input_mean`/`input_std`, e.g. a converted Caffe model), else ImageNet's."""
    config = getattr(model, "config", None) or {}
    mean = meta.get("mean") or config.get("input_mean") or IMAGENET_MEAN
    std = meta.get("std") or config.get("input_std") or IMAGENET_STD
    return tuple(mean), tuple(std)


def _object_array(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array (Ray Data stores arrays of differing shapes as a variable-shaped column)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _placeholder_image() -> np.ndarray:
    return np.zeros((1, 1, 3), np.uint8)


def _placeholder_mask() -> np.ndarray:
    return np.zeros((1, 1), np.uint8)


def _writable_status(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of the status columns that stages may update (zero-copy batches are read-only)."""
    for name in STATUS_COLUMNS:
        batch[name] = np.array(batch[name], dtype=object)
    return batch


def summary_columns(plan: InferencePlan, write: bool = False) -> list[str]:
    """The per-image columns that reach the driver (no pixels)."""
    columns = [ID, STATUS, ERROR_STAGE, SECONDS_DECODE, SECONDS_MODEL]
    if write:
        columns += WRITE_COLUMNS
    if plan.run_crf:
        columns.append(SECONDS_CRF)
    if plan.with_masks:
        columns.append(HAS_GT)
    if plan.table:
        columns += [CM_PLAIN, CM_TTA, CM_CRF]
    if plan.score:
        columns.append(CM)
    return columns


def _mark_error(batch: dict, i: int, stage: str, reason: str) -> None:
    batch[STATUS][i] = STATUS_ERROR
    batch[ERROR_STAGE][i] = stage
    batch[ERROR_REASON][i] = reason[:500]


def _error_reason(err: BaseException, uri: str, storage_options) -> str:
    """The error as text, with any credential of the storage options scrubbed out."""
    return scrub(f"{type(err).__name__}: {err}", resolve_storage_options(uri, storage_options))


def decode_stage(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    """Reads and decodes images (and ground-truth masks when scoring) with the shared row decoder;
    failures become error rows."""
    return guarded(plan.guard, "decode", batch, lambda b: _decode(b, plan))


def initial_status(n: int) -> dict[str, np.ndarray]:
    return {STATUS: np.full(n, STATUS_OK, dtype=object), ERROR_STAGE: np.full(n, "", dtype=object),
            ERROR_REASON: np.full(n, "", dtype=object)}


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
            _mark_error(out, i, row.error.stage, row.error.reason)
        ok = row is not None and row.error is None
        images.append(row.image if ok else _placeholder_image())
        has_gt[i] = ok and row.mask is not None
        masks.append(row.mask if has_gt[i] else _placeholder_mask())
    # Files of a batch are fetched concurrently: each image is charged an equal share.
    out.update({IMAGE: _object_array(images), SECONDS_DECODE: np.full(n, (time.perf_counter() - start) / max(n, 1))})
    if plan.with_masks:
        out.update({GT: _object_array(masks), HAS_GT: has_gt})
    return out


def _confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    from deeplab_core.metrics import confusion_matrix

    return confusion_matrix(np.array(pred), np.array(gt), num_classes)  # writable copies for torch


class ModelStage:
    """One model per actor; batches are grouped by image size and run through ``predict_probs``."""

    def __init__(self, model_ref, plan: InferencePlan, device: str, num_threads: int) -> None:
        import ray
        import torch

        model = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # NHWC on CPU: oneDNN's convolutions skip their reorders (precision.py)
        self.channels_last = device == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.plan = plan

    def _probs(self, images: list[np.ndarray], scales, flip: bool):
        import torch

        from deeplab_core.transforms import normalize
        from deeplab_core.tta import predict_probs

        batch = torch.stack([normalize(img, self.plan.mean, self.plan.std) for img in images])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        # Scoring (evaluate_model: promotion, registered metrics) runs in float32 like training's
        # validation, so the numbers compared are the same computation; masks may use bf16 on GPU.
        return predict_probs(self.model, batch, scales=scales, flip=flip, fusion=self.plan.fusion,
                             max_pixels=self.plan.max_pixels, autocast=False if self.plan.score else self.plan.autocast)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return guarded(self.plan.guard, "model", batch, self._run)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan, n = self.plan, len(batch[ID])
        batch = _writable_status(dict(batch))
        labels = [_placeholder_mask()] * n
        probs_out = [np.zeros((plan.num_classes, 1, 1), np.float16)] * n
        cms = {name: np.zeros((n, plan.num_classes, plan.num_classes), np.int64)
               for name in self._cm_columns()}
        seconds = np.zeros(n)
        crf_labels: list[np.ndarray | None] = [None] * n
        crf_seconds = np.zeros(n)
        plain_variant = tuple(plan.scales) == (1.0,) and not plan.flip
        for group in _groups_by_shape(batch):
            start = time.perf_counter()
            images = [batch[IMAGE][i] for i in group]
            try:
                probs = self._probs(images, plan.scales, plan.flip)
                plain = probs if (not plan.table or plain_variant) else self._probs(images, (1.0,), False)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory on one huge image
                for i in group:
                    _mark_error(batch, i, "model", f"{type(err).__name__}: {err}")
                continue
            if plan.crf_in_model:
                self._refine(batch, group, images, probs, crf_labels, crf_seconds)
            probs_np = probs.float().cpu().numpy()
            label_np = probs_np.argmax(1).astype(np.uint8)
            plain_np = plain.argmax(1).cpu().numpy().astype(np.uint8) if plan.table else None
            elapsed = (time.perf_counter() - start) / len(group)
            for j, i in enumerate(group):
                labels[i] = label_np[j]
                seconds[i] = elapsed
                if plan.run_crf and not plan.crf_in_model:
                    probs_out[i] = probs_np[j].astype(np.float16)  # half the bytes across the object store
                if plan.with_masks and batch[HAS_GT][i]:
                    if plan.table:
                        cms[CM_PLAIN][i] = _confusion(plain_np[j], batch[GT][i], plan.num_classes)
                        cms[CM_TTA][i] = _confusion(label_np[j], batch[GT][i], plan.num_classes)
                    if plan.score and not plan.run_crf:
                        cms[CM][i] = _confusion(label_np[j], batch[GT][i], plan.num_classes)
        out = {k: batch[k] for k in (ID, URI, STATUS, ERROR_STAGE, ERROR_REASON, SECONDS_DECODE)}
        out.update({LABEL: _object_array(labels), SECONDS_MODEL: seconds, **cms})
        if plan.crf_in_model:  # probabilities never leave the device; no CRF stage follows
            if plan.with_masks:
                out.update({HAS_GT: batch[HAS_GT], GT: batch[GT]})
            if plan.overlays:
                out[IMAGE] = batch[IMAGE]
            return _with_crf_labels(out, plan, crf_labels, crf_seconds)
        if plan.run_crf or plan.overlays:
            out[IMAGE] = batch[IMAGE]
        if plan.with_masks:
            out[HAS_GT] = batch[HAS_GT]
        if plan.run_crf:
            out[PROBS] = _object_array(probs_out)
            if plan.with_masks:
                out[GT] = batch[GT]
        return out

    def _refine(self, batch: dict, group: list[int], images: list[np.ndarray], probs, crf_labels: list,
                crf_seconds: np.ndarray) -> None:
        """The torch dense CRF on this actor's device, batched over a group of same-size images."""
        import torch

        from deeplab_core.crf_torch import dense_crf_torch

        start = time.perf_counter()
        try:
            rgb = torch.from_numpy(np.stack(images))
            refined = dense_crf_torch(rgb, probs.float(), **asdict(self.plan.crf_params))
            crf_np = refined.argmax(1).to(torch.uint8).cpu().numpy()
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: these images fail, not the job
            for i in group:
                _mark_error(batch, i, "crf", f"{type(err).__name__}: {err}")
            return
        elapsed = (time.perf_counter() - start) / len(group)
        for j, i in enumerate(group):
            crf_labels[i], crf_seconds[i] = crf_np[j], elapsed

    def _cm_columns(self) -> list[str]:
        names = [CM_PLAIN, CM_TTA] if self.plan.table else []
        if self.plan.score and not self.plan.run_crf:
            names.append(CM)
        return names


def _groups_by_shape(batch: dict[str, np.ndarray]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, status in enumerate(batch[STATUS]):
        if status == STATUS_OK:
            groups.setdefault(batch[IMAGE][i].shape, []).append(i)
    return list(groups.values())


def crf_stage(batch: dict[str, np.ndarray], plan: InferencePlan,
              write: WriteSpec | None = None) -> dict[str, np.ndarray]:
    """Dense CRF (pydensecrf, one image at a time) on the model's probabilities; with `write`,
    the refined masks are written by this same task (write_stage), as soon as they exist."""
    refined = guarded(plan.guard, "crf", batch, lambda b: _crf(b, plan))
    return refined if write is None else write_stage(refined, write)


def _crf(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    from deeplab_core.crf import dense_crf

    batch = _writable_status(dict(batch))
    n = len(batch[ID])
    crf_labels: list[np.ndarray | None] = [None] * n
    seconds = np.zeros(n)
    for i in range(n):
        if batch[STATUS][i] != STATUS_OK:
            continue
        start = time.perf_counter()
        try:
            refined = dense_crf(batch[IMAGE][i], batch[PROBS][i], **asdict(plan.crf_params))
        except Exception as err:  # noqa: BLE001
            _mark_error(batch, i, "crf", f"{type(err).__name__}: {err}")
            continue
        crf_labels[i] = refined.argmax(0).astype(np.uint8)
        seconds[i] = time.perf_counter() - start
    return _with_crf_labels(batch, plan, crf_labels, seconds)


def _with_crf_labels(batch: dict[str, np.ndarray], plan: InferencePlan, crf_labels: Sequence[np.ndarray | None],
                     seconds: np.ndarray) -> dict[str, np.ndarray]:
    """The CRF's output columns, whichever backend refined: the output label is the CRF's when
    ``plan.crf``; confusion matrices for the table (+CRF) and for scoring."""
    n = len(batch[ID])
    labels = list(batch[LABEL])
    cms = {}
    if plan.table:
        cms[CM_CRF] = np.zeros((n, plan.num_classes, plan.num_classes), np.int64)
    if plan.score:
        cms[CM] = np.zeros((n, plan.num_classes, plan.num_classes), np.int64)
    for i, crf_label in enumerate(crf_labels):
        if crf_label is None or batch[STATUS][i] != STATUS_OK:
            continue
        if plan.crf:
            labels[i] = crf_label
        if plan.with_masks and batch[HAS_GT][i]:
            if plan.table:
                cms[CM_CRF][i] = _confusion(crf_label, batch[GT][i], plan.num_classes)
            if plan.score:
                cms[CM][i] = _confusion(labels[i], batch[GT][i], plan.num_classes)
    keep = (ID, URI, STATUS, ERROR_STAGE, ERROR_REASON, SECONDS_DECODE, SECONDS_MODEL,
            HAS_GT, CM_PLAIN, CM_TTA)
    out = {k: batch[k] for k in keep if k in batch}
    out.update({LABEL: _object_array(labels), SECONDS_CRF: seconds, **cms})
    if plan.overlays:
        out[IMAGE] = batch[IMAGE]
    return out


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
    batch = _writable_status(dict(batch))
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
            _mark_error(batch, i, "write", _error_reason(err, spec.output, spec.storage_options))
            mask_uris[i] = overlay_uris[i] = ""
    out = {k: v for k, v in batch.items() if k not in (IMAGE, LABEL, URI, PROBS, GT)}
    now = datetime.now(timezone.utc).timestamp()
    out.update({OUTPUT_URI: np.array(mask_uris, dtype=object), OVERLAY_URI: np.array(overlay_uris, dtype=object),
                CLASSES: np.array(classes, dtype=object), FINISHED_AT: np.full(n, now)})
    return out
