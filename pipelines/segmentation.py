"""Batch segmentation on Ray Data: multi-scale + flip inference, dense CRF, idempotent outputs.

Stages (streaming: every stage runs while the others do)::

    list prefix / read manifest  (driver)     ids checked, --since filter, finished ids skipped
      -> read + decode           CPU tasks    bad input becomes an error row, never a crash
      -> model                   actor pool   predict_probs (scales, flip); GPU when present
      -> dense CRF               CPU tasks    separate processes (pydensecrf holds the GIL)
      -> write                   CPU tasks    masks, overlays, then the batch's results/errors

Outputs under ``--output``::

    masks/<id>.png               palette PNG (VOC colours; pixel values are the class ids)
    overlays/<id>.jpg            with --overlays
    results/<run>-<n>.parquet    one row per image {id, uri, output_uri, status, classes, seconds_*}
    errors/<run>-<n>.parquet     ErrorRecord rows {id, uri, stage, reason}
    _state.json                  watermark for --since last, and the last run's summary

Idempotency: a mask is written atomically (an object-store PUT, or temp file + rename locally)
and its results row only after it, so an image counts as done only when its ``ok`` row and its
mask both exist; a re-run skips exactly those, a killed run redoes at most its in-flight batches.
Reading the results keeps the latest row per id (:func:`read_results`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from deeplab_core.constants import DEFAULT_SCALES, CRFParams
from pipelines.decode import DEFAULT_MAX_PIXELS, BadInput, decode_image, decode_mask
from pipelines.errors import ErrorRecord, RunSummary, errors_table
from pipelines.manifest import IMAGE_EXTENSIONS, read_manifest
from pipelines.storage import (
    absolute_uri,
    get_fs,
    is_local,
    join_uri,
    make_parent_dirs,
    redact,
    resolve_storage_options,
    scrub,
    table_format,
    uri_for,
)

log = logging.getLogger(__name__)

STATE_FILE = "_state.json"
RESULTS_DIR, ERRORS_DIR, MASKS_DIR, OVERLAYS_DIR = "results", "errors", "masks", "overlays"
MASK_SUFFIX, OVERLAY_SUFFIX = ".png", ".jpg"
STATUS_OK, STATUS_ERROR = "ok", "error"
DEFAULT_EXPERIMENT = "deeplab-segmentation"

RESULTS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("output_uri", pa.string()),
    ("overlay_uri", pa.string()),
    ("status", pa.string()),
    ("classes", pa.list_(pa.int32())),
    ("seconds_decode", pa.float64()),
    ("seconds_model", pa.float64()),
    ("seconds_crf", pa.float64()),
    ("run_id", pa.string()),
    ("model_uri", pa.string()),
    ("finished_at", pa.timestamp("us", tz="UTC")),
])


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SegmentConfig:
    model: str  # models:/name@alias, models:/name/version, runs:/id/model, checkpoint dir/file
    input: str  # image prefix, or a manifest (.parquet/.csv/.jsonl)
    output: str
    scales: tuple[float, ...] = DEFAULT_SCALES
    flip: bool = True
    fusion: str = "mean"
    max_pixels: int | None = None  # TTA memory budget per scaled image (tiles above it)
    crf: bool = True
    crf_params: CRFParams = field(default_factory=CRFParams)
    overlays: bool = False
    overlay_alpha: float = 0.5
    batch_size: int = 4
    num_model_actors: int = 1
    cpus_per_model_actor: float = 1.0
    crf_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda
    since: str | None = None  # ISO time, or "last" (the watermark in _state.json)
    evaluate: bool = False
    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    max_input_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard for decoding
    storage_options: Mapping[str, Any] | None = None  # merged over the AWS_* env options
    progress_every_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.fusion not in ("mean", "max"):
            raise ValueError(f"fusion must be 'mean' or 'max', got {self.fusion!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("batch_size", "num_model_actors", "crf_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.since not in (None, "last"):
            try:
                parse_time(self.since)
            except ValueError:
                raise ValueError(f"since must be an ISO 8601 time or 'last', got {self.since!r}") from None


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
    table: bool  # evaluation table: confusion matrices for plain, +MS+flip, +CRF
    score: bool  # one confusion matrix for the output masks (evaluate_model)
    overlays: bool
    max_input_pixels: int
    storage_options: Mapping[str, Any] | None

    @property
    def run_crf(self) -> bool:
        return self.crf or self.table

    @property
    def with_masks(self) -> bool:
        return self.table or self.score


# --------------------------------------------------------------------------- ids and output keys

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def check_id(record_id: str) -> str:
    """Returns ``record_id`` if it is safe as a relative output key, else raises ValueError.

    Output keys are ``masks/<id>.png``: an id must not climb out of (``..``), replace (absolute
    path, ``scheme:``/drive prefix) or confuse (backslash, NUL and other control characters,
    empty or ``.`` components) the output prefix. Ids are rejected rather than rewritten so two
    different ids can never collide on one mask.
    """
    if not isinstance(record_id, str) or not record_id:
        raise ValueError("empty id")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in record_id):
        raise ValueError("id contains a control character (NUL, newline, ...)")
    if "\\" in record_id:
        raise ValueError("id contains a backslash")
    if _SCHEME.match(record_id):
        raise ValueError("id starts with a URL scheme or drive prefix")
    if record_id.startswith(("/", "~")):
        raise ValueError("id is an absolute path")
    if any(part in ("", ".", "..") for part in record_id.split("/")):
        raise ValueError("id has an empty, '.' or '..' path component")
    return record_id


@dataclass(frozen=True)
class OutputLayout:
    """Where a run's outputs go; every key is derived from a checked id."""

    root: str  # URI

    def uri(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def mask_uri(self, record_id: str) -> str:
        return self.uri(MASKS_DIR, check_id(record_id) + MASK_SUFFIX)

    def overlay_uri(self, record_id: str) -> str:
        return self.uri(OVERLAYS_DIR, check_id(record_id) + OVERLAY_SUFFIX)


def write_atomically(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Readers see the whole file or none of it: one PUT on object stores (objects appear whole);
    elsewhere a hidden temp file in the same directory renamed over the target."""
    fs, path = get_fs(uri, storage_options)
    make_parent_dirs(fs, path, uri)
    if not is_local(uri):
        fs.pipe_file(path, data)
        return
    directory, name = posixpath.split(path)
    temp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _list_files(uri: str, storage_options, suffix: str) -> list[str]:
    """Paths (inside the filesystem) under ``uri`` ending in ``suffix``; none if it is missing."""
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache(path)  # s3fs caches listings per process; a listing must be current
    try:
        return sorted(p for p in fs.find(path) if p.endswith(suffix))
    except FileNotFoundError:
        return []


def read_results(output: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """All results rows under ``<output>/results/``, one per id (the latest ``finished_at`` wins).

    A part file that cannot be read (e.g. cut short on a filesystem without atomic writes) is
    skipped with a warning: its images will simply be segmented again.
    """
    import pyarrow.parquet as pq

    fs, _ = get_fs(output, storage_options)
    tables = []
    for path in _list_files(join_uri(output, RESULTS_DIR), storage_options, ".parquet"):
        try:
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f).select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA))
        except Exception as err:  # noqa: BLE001 - an unreadable part only costs a redo
            log.warning("skipping unreadable results part %s: %s", path, type(err).__name__)
    if not tables:
        return RESULTS_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    table = table.sort_by([("id", "ascending"), ("finished_at", "ascending")])
    ids = table.column("id").to_numpy(zero_copy_only=False)
    last_of_id = np.append(ids[1:] != ids[:-1], True)
    return table.filter(pa.array(last_of_id))


def finished_ids(output: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Ids whose latest results row is ``ok`` and whose mask exists."""
    results = read_results(output, storage_options)
    ok = {
        row["id"] for row in results.select(["id", "status"]).to_pylist() if row["status"] == STATUS_OK
    }
    if not ok:
        return set()
    masks_uri = join_uri(output, MASKS_DIR)
    _, masks_path = get_fs(masks_uri, storage_options)
    prefix = masks_path.rstrip("/") + "/"
    present = {
        p[len(prefix):-len(MASK_SUFFIX)]
        for p in _list_files(masks_uri, storage_options, MASK_SUFFIX)
        if p.startswith(prefix)
    }
    return ok & present


def read_state(output: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    fs, path = get_fs(join_uri(output, STATE_FILE), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputItem:
    id: str
    uri: str
    mask_uri: str = ""


@dataclass
class InputListing:
    items: list[InputItem]
    errors: list[ErrorRecord]  # ids that cannot be output keys, duplicate ids
    read: int  # everything selected for this run (after --since)
    watermark: datetime | None  # newest modification time seen (prefix inputs)


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2024-05-01``, ``2024-05-01T12:00:00Z``, with offset); naive means UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def modified_time(info: Mapping[str, Any]) -> datetime | None:
    """A file's modification time from an fsspec ``info`` dict (s3fs, gcsfs, adlfs, local)."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, str):
            return parse_time(value)
    return None


def is_manifest(uri: str) -> bool:
    try:
        table_format(uri)
    except ValueError:
        return False
    return True


def _checked(items: Iterable[InputItem], check_ids: bool) -> tuple[list[InputItem], list[ErrorRecord]]:
    """Drops (as error records) ids that repeat an earlier id or, with ``check_ids``, that are
    unsafe as output keys."""
    kept, errors, seen = [], [], {}
    for item in items:
        try:
            if check_ids:
                check_id(item.id)
        except ValueError as err:
            errors.append(ErrorRecord(item.id, item.uri, "id", f"unusable id: {err}"))
            continue
        if item.id in seen:
            errors.append(ErrorRecord(item.id, item.uri, "id", f"duplicate id (also {seen[item.id]})"))
            continue
        seen[item.id] = item.uri
        kept.append(item)
    return kept, errors


def list_inputs(
    input_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    since: datetime | None = None,
    exclude_prefix: str | None = None,
    check_ids: bool = True,
) -> InputListing:
    """The run's inputs: manifest rows, or the images under a prefix (id = relative path without
    the extension). ``since`` keeps prefix files modified at or after it (inclusive, so a file
    written in the watermark's second is not lost; finished ones are skipped anyway).
    ``exclude_prefix`` (the output) is never listed as input. ``check_ids=False`` (nothing will be
    written, e.g. evaluation) keeps ids that would be unsafe output keys."""
    if is_manifest(input_uri):
        if since is not None:
            raise ValueError("--since needs a prefix input (manifest rows carry no modification time)")
        table = read_manifest(input_uri, storage_options)
        rows = table.to_pylist()
        items, errors = _checked((InputItem(r["id"], r["image_uri"], r["mask_uri"] or "") for r in rows),
                                 check_ids)
        return InputListing(items, errors, read=len(rows), watermark=None)

    fs, root = get_fs(input_uri, storage_options)
    prefix = root.rstrip("/") + "/"
    excluded = get_fs(exclude_prefix, storage_options)[1].rstrip("/") + "/" if exclude_prefix else None
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    selected, newest = [], None
    for path, info in sorted(found.items()):
        if not path.startswith(prefix) or (excluded and path.startswith(excluded)):
            continue
        relative = path[len(prefix):]
        stem, ext = posixpath.splitext(relative)
        if ext.lower() not in IMAGE_EXTENSIONS or posixpath.basename(stem).startswith("."):
            continue
        mtime = modified_time(info)
        if mtime is not None:
            newest = mtime if newest is None else max(newest, mtime)
        if since is not None and mtime is not None and mtime < since:
            continue
        selected.append(InputItem(stem, uri_for(fs, path, input_uri)))
    items, errors = _checked(selected, check_ids)
    return InputListing(items, errors, read=len(selected), watermark=newest)


# --------------------------------------------------------------------------- the model


def resolve_model_uri(uri: str) -> str:
    """``models:/name@alias`` -> ``models:/name/<version>``, resolved once on the driver so every
    actor loads the same version even if the alias moves during the run. Others are returned as is
    (local paths made absolute)."""
    match = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if match is None:
        return uri if uri.startswith(("models:/", "runs:/")) else absolute_uri(uri)
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias(match.group(1), match.group(2))
    return f"models:/{match.group(1)}/{version.version}"


def num_classes_of(model) -> int:
    config = getattr(model, "config", None) or {}
    if "num_classes" in config:
        return int(config["num_classes"])
    import torch

    with torch.inference_mode():  # a model without .config: ask it
        return int(model.eval()(torch.zeros(1, 3, 64, 64)).shape[1])


def normalisation_of(meta: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from deeplab_core.transforms import IMAGENET_MEAN, IMAGENET_STD

    return tuple(meta.get("mean") or IMAGENET_MEAN), tuple(meta.get("std") or IMAGENET_STD)


# --------------------------------------------------------------------------- stages (workers)


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
    for name in ("status", "error_stage", "error_reason"):
        batch[name] = np.array(batch[name], dtype=object)
    return batch


def summary_columns(plan: InferencePlan) -> list[str]:
    """The per-image columns that reach the driver (no pixels)."""
    columns = ["id", "status", "error_stage", "seconds_decode", "seconds_model"]
    if plan.run_crf:
        columns.append("seconds_crf")
    if plan.with_masks:
        columns.append("has_gt")
    if plan.table:
        columns += ["cm_plain", "cm_tta", "cm_crf"]
    if plan.score:
        columns.append("cm")
    return columns


def _mark_error(batch: dict, i: int, stage: str, reason: str) -> None:
    batch["status"][i] = STATUS_ERROR
    batch["error_stage"][i] = stage
    batch["error_reason"][i] = reason[:500]


def _error_reason(err: BaseException, uri: str, storage_options) -> str:
    """The error as text, with any credential of the storage options scrubbed out."""
    return scrub(f"{type(err).__name__}: {err}", resolve_storage_options(uri, storage_options))


def _read_bytes(uri: str, storage_options) -> bytes:
    fs, path = get_fs(uri, storage_options)
    return fs.cat_file(path)


def decode_stage(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    """Reads and decodes images (and ground-truth masks when scoring); failures become error rows."""
    n = len(batch["id"])
    out = {
        "id": batch["id"], "uri": batch["uri"],
        "status": np.full(n, STATUS_OK, dtype=object),
        "error_stage": np.full(n, "", dtype=object), "error_reason": np.full(n, "", dtype=object),
    }
    images, masks = [_placeholder_image()] * n, [_placeholder_mask()] * n
    has_gt, seconds = np.zeros(n, bool), np.zeros(n)
    for i in range(n):
        start = time.perf_counter()
        stage = "read"
        try:
            data = _read_bytes(batch["uri"][i], plan.storage_options)
            stage = "image"
            images[i] = decode_image(data, plan.max_input_pixels)
            if plan.with_masks and batch["mask_uri"][i]:
                stage = "mask"
                mask_data = _read_bytes(batch["mask_uri"][i], plan.storage_options)
                masks[i] = decode_mask(mask_data, plan.num_classes, images[i].shape)
                has_gt[i] = True
        except BadInput as err:
            _mark_error(out, i, err.stage, err.reason)
            images[i], masks[i], has_gt[i] = _placeholder_image(), _placeholder_mask(), False
        except Exception as err:  # noqa: BLE001 - unreadable input is an error row, not a crash
            failed_uri = batch["mask_uri"][i] if stage == "mask" else batch["uri"][i]
            _mark_error(out, i, stage, _error_reason(err, failed_uri, plan.storage_options))
            images[i], masks[i], has_gt[i] = _placeholder_image(), _placeholder_mask(), False
        seconds[i] = time.perf_counter() - start
    out.update(image=_object_array(images), seconds_decode=seconds)
    if plan.with_masks:
        out.update(gt=_object_array(masks), has_gt=has_gt)
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
        self.plan = plan

    def _probs(self, images: list[np.ndarray], scales, flip: bool):
        import torch

        from deeplab_core.transforms import normalize
        from deeplab_core.tta import predict_probs

        batch = torch.stack([normalize(img, self.plan.mean, self.plan.std) for img in images])
        return predict_probs(self.model, batch, scales=scales, flip=flip, fusion=self.plan.fusion,
                             max_pixels=self.plan.max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan, n = self.plan, len(batch["id"])
        batch = _writable_status(dict(batch))
        labels = [_placeholder_mask()] * n
        probs_out = [np.zeros((plan.num_classes, 1, 1), np.float16)] * n
        cms = {name: np.zeros((n, plan.num_classes, plan.num_classes), np.int64)
               for name in self._cm_columns()}
        seconds = np.zeros(n)
        plain_variant = tuple(plan.scales) == (1.0,) and not plan.flip
        for group in _groups_by_shape(batch):
            start = time.perf_counter()
            images = [batch["image"][i] for i in group]
            try:
                probs = self._probs(images, plan.scales, plan.flip)
                plain = probs if (not plan.table or plain_variant) else self._probs(images, (1.0,), False)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory on one huge image
                for i in group:
                    _mark_error(batch, i, "model", f"{type(err).__name__}: {err}")
                continue
            probs_np = probs.float().cpu().numpy()
            label_np = probs_np.argmax(1).astype(np.uint8)
            plain_np = plain.argmax(1).cpu().numpy().astype(np.uint8) if plan.table else None
            elapsed = (time.perf_counter() - start) / len(group)
            for j, i in enumerate(group):
                labels[i] = label_np[j]
                seconds[i] = elapsed
                if plan.run_crf:
                    probs_out[i] = probs_np[j].astype(np.float16)  # half the bytes across the object store
                if plan.with_masks and batch["has_gt"][i]:
                    if plan.table:
                        cms["cm_plain"][i] = _confusion(plain_np[j], batch["gt"][i], plan.num_classes)
                        cms["cm_tta"][i] = _confusion(label_np[j], batch["gt"][i], plan.num_classes)
                    if plan.score and not plan.run_crf:
                        cms["cm"][i] = _confusion(label_np[j], batch["gt"][i], plan.num_classes)
        out = {k: batch[k] for k in ("id", "uri", "status", "error_stage", "error_reason", "seconds_decode")}
        out.update(label=_object_array(labels), seconds_model=seconds, **cms)
        if plan.run_crf or plan.overlays:
            out["image"] = batch["image"]
        if plan.with_masks:
            out["has_gt"] = batch["has_gt"]
        if plan.run_crf:
            out["probs"] = _object_array(probs_out)
            if plan.with_masks:
                out["gt"] = batch["gt"]
        return out

    def _cm_columns(self) -> list[str]:
        names = ["cm_plain", "cm_tta"] if self.plan.table else []
        if self.plan.score and not self.plan.run_crf:
            names.append("cm")
        return names


def _groups_by_shape(batch: dict[str, np.ndarray]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, status in enumerate(batch["status"]):
        if status == STATUS_OK:
            groups.setdefault(batch["image"][i].shape, []).append(i)
    return list(groups.values())


def crf_stage(batch: dict[str, np.ndarray], plan: InferencePlan) -> dict[str, np.ndarray]:
    """Dense CRF on the model's probabilities; the output label is the CRF's when ``plan.crf``."""
    from deeplab_core.crf import dense_crf

    n = len(batch["id"])
    batch = _writable_status(dict(batch))
    labels = list(batch["label"])
    seconds = np.zeros(n)
    cms = {}
    if plan.table:
        cms["cm_crf"] = np.zeros((n, plan.num_classes, plan.num_classes), np.int64)
    if plan.score:
        cms["cm"] = np.zeros((n, plan.num_classes, plan.num_classes), np.int64)
    for i in range(n):
        if batch["status"][i] != STATUS_OK:
            continue
        start = time.perf_counter()
        try:
            refined = dense_crf(batch["image"][i], batch["probs"][i], **asdict(plan.crf_params))
        except Exception as err:  # noqa: BLE001
            _mark_error(batch, i, "crf", f"{type(err).__name__}: {err}")
            continue
        crf_label = refined.argmax(0).astype(np.uint8)
        seconds[i] = time.perf_counter() - start
        if plan.crf:
            labels[i] = crf_label
        if plan.with_masks and batch["has_gt"][i]:
            if plan.table:
                cms["cm_crf"][i] = _confusion(crf_label, batch["gt"][i], plan.num_classes)
            if plan.score:
                cms["cm"][i] = _confusion(labels[i], batch["gt"][i], plan.num_classes)
    keep = ("id", "uri", "status", "error_stage", "error_reason", "seconds_decode", "seconds_model",
            "has_gt", "cm_plain", "cm_tta")
    out = {k: batch[k] for k in keep if k in batch}
    out.update(label=_object_array(labels), seconds_crf=seconds, **cms)
    if plan.overlays:
        out["image"] = batch["image"]
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
    """Writes masks (and overlays), then this batch's results and errors part files."""
    layout = OutputLayout(spec.output)
    n = len(batch["id"])
    batch = _writable_status(dict(batch))
    rows, errors = [], []
    for i in range(n):
        record_id, uri = str(batch["id"][i]), str(batch["uri"][i])
        mask_uri = overlay_uri = None
        classes: list[int] = []
        if batch["status"][i] == STATUS_OK:
            label = batch["label"][i]
            try:
                mask_uri = layout.mask_uri(record_id)
                write_atomically(mask_uri, _png_bytes(label), spec.storage_options)
                if spec.overlays:
                    overlay_uri = layout.overlay_uri(record_id)
                    data = _jpeg_bytes(batch["image"][i], label, spec.overlay_alpha)
                    write_atomically(overlay_uri, data, spec.storage_options)
                classes = np.flatnonzero(np.bincount(label.ravel(), minlength=1)).tolist()
            except Exception as err:  # noqa: BLE001
                _mark_error(batch, i, "write", _error_reason(err, spec.output, spec.storage_options))
                mask_uri = overlay_uri = None
        ok = batch["status"][i] == STATUS_OK
        if not ok:
            errors.append(ErrorRecord(record_id, uri, str(batch["error_stage"][i]), str(batch["error_reason"][i])))
        rows.append({
            "id": record_id, "uri": uri, "output_uri": mask_uri, "overlay_uri": overlay_uri,
            "status": STATUS_OK if ok else STATUS_ERROR, "classes": classes,
            "seconds_decode": float(batch["seconds_decode"][i]),
            "seconds_model": float(batch["seconds_model"][i]) if ok else None,
            "seconds_crf": float(batch["seconds_crf"][i]) if ok and spec.crf else None,
            "run_id": spec.run_id, "model_uri": spec.model_uri,
            "finished_at": datetime.now(timezone.utc),
        })
    write_parts(spec, rows, errors)
    return {k: v for k, v in batch.items() if k not in ("image", "label", "uri", "error_reason")}


def write_parts(spec: WriteSpec, rows: list[dict], errors: list[ErrorRecord]) -> None:
    """One results part and (if any) one errors part, each written atomically; masks first."""
    part = f"{spec.run_id}-{uuid.uuid4().hex[:12]}.parquet"
    if errors:
        data = _parquet_bytes(errors_table(errors))
        write_atomically(join_uri(spec.output, ERRORS_DIR, part), data, spec.storage_options)
    if rows:
        data = _parquet_bytes(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
        write_atomically(join_uri(spec.output, RESULTS_DIR, part), data, spec.storage_options)


# --------------------------------------------------------------------------- the pipeline (driver)


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")


def use_gpu(device: str) -> bool:
    import ray

    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return device == "cuda"


def build_dataset(items: Sequence[InputItem], plan: InferencePlan, model_ref, *, batch_size: int,
                  num_model_actors: int, cpus_per_model_actor: float, crf_workers: int, gpu: bool,
                  write: WriteSpec | None):
    """The Ray Data pipeline over ``items``; its rows are per-image summaries (no pixels)."""
    import ray.data

    rows = [asdict(item) for item in items]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), math.ceil(len(rows) / batch_size))))
    # 0.5 CPU: unequal resources keep Ray Data from fusing the decode into the model actors,
    # so decoding overlaps inference instead of running inside the actor.
    ds = ds.map_batches(decode_stage, fn_kwargs={"plan": plan}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=0.5)
    model_resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus_per_model_actor}
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs={"model_ref": model_ref, "plan": plan, "device": "cuda" if gpu else "cpu",
                               "num_threads": int(max(1, cpus_per_model_actor))},
        compute=ray.data.ActorPoolStrategy(size=num_model_actors),
        batch_size=batch_size, batch_format="numpy", **model_resources,
    )
    if plan.run_crf:
        ds = ds.map_batches(crf_stage, fn_kwargs={"plan": plan}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=crf_workers))
    if write is not None:
        ds = ds.map_batches(write_stage, fn_kwargs={"spec": write}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=0.25)
    return ds.select_columns(summary_columns(plan))


@dataclass
class Tally:
    """What the driver sees stream past: counts, stage times, summed confusion matrices."""

    ok: int = 0
    errors: int = 0
    scored: int = 0  # ok images with a ground-truth mask (in the confusion matrices)
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "model": 0.0, "crf": 0.0})
    cms: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.ok + self.errors

    def add(self, batch: dict[str, np.ndarray]) -> None:
        status = batch["status"]
        ok = status == STATUS_OK
        self.ok += int(ok.sum())
        self.errors += int((~ok).sum())
        if "has_gt" in batch:
            self.scored += int((ok & np.asarray(batch["has_gt"], dtype=bool)).sum())
        for stage in batch["error_stage"][~ok]:
            self.errors_by_stage[str(stage)] = self.errors_by_stage.get(str(stage), 0) + 1
        for name in self.seconds:
            column = batch.get(f"seconds_{name}")
            if column is not None:
                self.seconds[name] += float(np.asarray(column, dtype=float)[ok].sum())
        for name in ("cm_plain", "cm_tta", "cm_crf", "cm"):
            if name in batch:
                total = np.asarray(batch[name])[ok].sum(axis=0)
                self.cms[name] = self.cms.get(name, 0) + total


def consume(ds, total: int, every_s: float, label: str = "segment") -> Tally:
    tally = Tally()
    start = last = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        tally.add(batch)
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            rate = tally.done / max(now - start, 1e-9)
            print(f"[{label}] {tally.done}/{total} images (ok {tally.ok}, errors {tally.errors}), "
                  f"{rate:.2f} images/s", flush=True)
    return tally


@dataclass
class SegmentReport:
    run_id: str
    model_uri: str
    read: int
    ok: int
    errors: int
    skipped: int
    seconds: float
    stage_seconds: dict[str, float]
    errors_by_stage: dict[str, int]
    evaluation: dict[str, dict] | None = None
    table: str | None = None
    watermark: str | None = None

    def __post_init__(self) -> None:
        if self.read != self.ok + self.errors + self.skipped:
            raise RuntimeError(f"inputs unaccounted for: read={self.read} != ok={self.ok} + "
                               f"errors={self.errors} + skipped={self.skipped}")

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (f"read {self.read} = ok {self.ok} + errors {self.errors} + skipped {self.skipped} "
                f"(already done); {self.images_per_s:.2f} images/s over {self.seconds:.1f} s")

    def run_summary(self) -> RunSummary:
        """The processed part as the shared ``read == ok + errors`` summary (skipped left out)."""
        return RunSummary(read=self.read - self.skipped, ok=self.ok, errors=self.errors)


def _format_scales(scales: Sequence[float]) -> str:
    return ",".join(f"{s:g}" for s in scales)


def evaluation_rows(cfg: SegmentConfig) -> list[tuple[str, str, bool, bool, str]]:
    scales = _format_scales(cfg.scales)
    return [
        ("plain", "1", False, False, "cm_plain"),
        ("+ multi-scale + flip", scales, cfg.flip, False, "cm_tta"),
        ("+ dense CRF", scales, cfg.flip, True, "cm_crf"),
    ]


def evaluation_table(tally: Tally, cfg: SegmentConfig, images: int) -> tuple[dict[str, dict], str]:
    """Metrics per variant and the Markdown table (mIoU, pixel accuracy) for --eval."""
    from deeplab_core.metrics import segmentation_metrics

    metrics, lines = {}, [
        f"| variant | scales | flip | CRF | mIoU | pixel acc | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, scales, flip, crf, column in evaluation_rows(cfg):
        result = segmentation_metrics(tally.cms[column])
        metrics[name] = result
        crf_text = f"yes ({cfg.crf_params.iterations} it)" if crf else "no"
        lines.append(f"| {name} | {scales} | {'yes' if flip else 'no'} | {crf_text} | "
                     f"{100 * result['mIoU']:.2f} | {100 * result['pixel_acc']:.2f} | {images} |")
    return metrics, "\n".join(lines)


_METRIC_KEYS = {"plain": "plain", "+ multi-scale + flip": "msf", "+ dense CRF": "msf_crf"}


@contextmanager
def tracking_uri_set(uri: str | None):
    """MLflow's tracking URI set to ``uri`` for the block (registry URIs resolve against it), and
    the caller's restored afterwards. ``None`` leaves it alone."""
    if uri is None:
        yield
        return
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_to_mlflow(cfg: SegmentConfig, report: SegmentReport) -> str:
    """One run in ``cfg.experiment`` (current tracking URI): params, counts, evaluation, summary."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    params = {
        "model": cfg.model, "model_resolved": report.model_uri, "input": cfg.input, "output": cfg.output,
        "scales": _format_scales(cfg.scales), "flip": cfg.flip, "fusion": cfg.fusion, "crf": cfg.crf,
        "max_pixels": cfg.max_pixels, "batch_size": cfg.batch_size, "since": cfg.since,
        **{f"crf_{k}": v for k, v in asdict(cfg.crf_params).items()},
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"segment-{report.run_id}") as run:
        mlflow.log_params(redact(params))
        mlflow.log_metrics({"images_read": report.read, "images_ok": report.ok,
                            "images_errors": report.errors, "images_skipped": report.skipped,
                            "images_per_s": report.images_per_s, "seconds": report.seconds})
        if report.evaluation:
            for name, result in report.evaluation.items():
                key = _METRIC_KEYS[name]
                mlflow.log_metrics({f"mIoU_{key}": result["mIoU"], f"pixel_acc_{key}": result["pixel_acc"]})
            mlflow.log_text(report.table + "\n", "evaluation.md")
        mlflow.log_dict(asdict(report), "summary.json")
        return run.info.run_id


def _write_state(cfg: SegmentConfig, report: SegmentReport, options) -> None:
    state = {
        "watermark": report.watermark,
        "last_run": {k: v for k, v in asdict(report).items() if k not in ("evaluation", "table")},
        "updated_at": datetime.now(timezone.utc).isoformat(),
    }
    write_atomically(join_uri(cfg.output, STATE_FILE), json.dumps(state, indent=2).encode(), options)


def _since(cfg: SegmentConfig, state: Mapping[str, Any]) -> datetime | None:
    if cfg.since is None:
        return None
    if cfg.since == "last":
        return parse_time(state["watermark"]) if state.get("watermark") else None
    return parse_time(cfg.since)


def make_plan(cfg: SegmentConfig, model, meta: Mapping[str, Any], *, table: bool, score: bool) -> InferencePlan:
    mean, std = normalisation_of(meta)
    return InferencePlan(
        num_classes=num_classes_of(model), mean=mean, std=std, scales=tuple(cfg.scales), flip=cfg.flip,
        fusion=cfg.fusion, max_pixels=cfg.max_pixels, crf=cfg.crf, crf_params=cfg.crf_params,
        table=table, score=score, overlays=cfg.overlays, max_input_pixels=cfg.max_input_pixels,
        storage_options=cfg.storage_options,
    )


def run_segmentation(cfg: SegmentConfig) -> SegmentReport:
    """Runs the job; returns (and prints) the report. See the module docstring."""
    with tracking_uri_set(cfg.tracking_uri):
        return _run(cfg)


def _run(cfg: SegmentConfig) -> SegmentReport:
    import ray

    from pipelines.model_io import load_model

    started = time.monotonic()
    cfg = replace(cfg, input=absolute_uri(cfg.input), output=absolute_uri(cfg.output).rstrip("/"))
    options = cfg.storage_options
    ensure_ray()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    state = read_state(cfg.output, options)
    since = _since(cfg, state)
    listing = list_inputs(cfg.input, options, since=since, exclude_prefix=cfg.output)
    done = finished_ids(cfg.output, options)
    todo = [item for item in listing.items if item.id not in done]
    skipped = len(listing.items) - len(todo)
    print(f"[segment] run {run_id}: {listing.read} input(s) from {cfg.input}"
          + (f" modified since {since.isoformat()}" if since else "")
          + f"; {skipped} already done, {len(listing.errors)} unusable id(s), {len(todo)} to segment",
          flush=True)

    model_uri = resolve_model_uri(cfg.model)
    write = WriteSpec(cfg.output, run_id, model_uri, cfg.crf, cfg.overlays, cfg.overlay_alpha, options)
    if listing.errors:
        write_parts(write, [_error_row(e, write) for e in listing.errors], listing.errors)

    tally = Tally()
    evaluation = table = None
    if todo:
        model, meta = load_model(model_uri, storage_options=options)
        evaluate = cfg.evaluate and any(item.mask_uri for item in todo)
        if cfg.evaluate and not evaluate:
            print("[segment] --eval: no ground-truth masks among the inputs (use a manifest with "
                  "mask_uri); no evaluation", flush=True)
        plan = make_plan(cfg, model, meta, table=evaluate, score=False)
        gpu = use_gpu(cfg.device)
        print(f"[segment] model {model_uri} ({plan.num_classes} classes) on {'GPU' if gpu else 'CPU'}; "
              f"scales {_format_scales(cfg.scales)}, flip {cfg.flip}, CRF {cfg.crf}", flush=True)
        model_ref = ray.put(model)
        ds = build_dataset(todo, plan, model_ref, batch_size=cfg.batch_size,
                           num_model_actors=cfg.num_model_actors, cpus_per_model_actor=cfg.cpus_per_model_actor,
                           crf_workers=cfg.crf_workers, gpu=gpu, write=write)
        tally = consume(ds, len(todo), cfg.progress_every_s)
        if evaluate:
            evaluation, table = evaluation_table(tally, cfg, tally.scored)

    watermark = listing.watermark
    previous = parse_time(state["watermark"]) if state.get("watermark") else None
    if previous is not None and (watermark is None or previous > watermark):
        watermark = previous
    errors_by_stage = dict(tally.errors_by_stage)
    if listing.errors:
        errors_by_stage["id"] = errors_by_stage.get("id", 0) + len(listing.errors)
    report = SegmentReport(
        run_id=run_id, model_uri=model_uri, read=listing.read, ok=tally.ok,
        errors=tally.errors + len(listing.errors), skipped=skipped,
        seconds=time.monotonic() - started, stage_seconds=dict(tally.seconds),
        errors_by_stage=errors_by_stage, evaluation=evaluation, table=table,
        watermark=watermark.isoformat() if watermark else None,
    )
    _write_state(cfg, report, options)
    print(f"[segment] {report.summary_line()}", flush=True)
    if report.errors:
        print(f"[segment] errors by stage: {report.errors_by_stage} (see {join_uri(cfg.output, ERRORS_DIR)})",
              flush=True)
    if table:
        print("\n" + table + "\n", flush=True)
    if cfg.tracking_uri:
        mlflow_run = log_to_mlflow(cfg, report)
        print(f"[segment] logged to MLflow run {mlflow_run}", flush=True)
    return report


def _error_row(error: ErrorRecord, spec: WriteSpec) -> dict:
    return {
        "id": error.id, "uri": error.uri, "output_uri": None, "overlay_uri": None, "status": STATUS_ERROR,
        "classes": [], "seconds_decode": 0.0, "seconds_model": None, "seconds_crf": None,
        "run_id": spec.run_id, "model_uri": spec.model_uri, "finished_at": datetime.now(timezone.utc),
    }

