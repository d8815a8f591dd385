"""Evaluate a model on a manifest with ground-truth masks: the segmentation pipeline, scoring
instead of writing.

    evaluate_model("models:/deeplab/3", "s3://b/data/manifests/val.parquet")  # plain inference
    evaluate_model(model, manifest, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, crf=True)

The same Ray Data stages as the batch job (decode tasks -> model actors -> CRF tasks) produce one
confusion matrix per image; their sum gives the exact dataset metrics
(``deeplab_core.metrics.segmentation_metrics``). Rows without a mask are left out; rows whose
image or mask is bad are counted in ``num_errors`` and left out of the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from deeplab_core.constants import CRFParams, TTASettings
from deeplab_core.metrics import segmentation_metrics
from pipelines.tracking import load_model
from pipelines.common.ray_session import ensure_ray, use_gpu
from pipelines.segmentation import crf_settings
from pipelines.segmentation.columns import CM
from pipelines.segmentation.config import DEFAULT_MAX_INPUT_PIXELS
from pipelines.segmentation.io import list_inputs
from pipelines.segmentation.pipeline import build_dataset, resolve_model
from pipelines.segmentation.report import consume
from pipelines.segmentation.stages import InferencePlan


def _load(model_or_uri: nn.Module | str, storage_options) -> tuple[nn.Module, dict, str]:
    if isinstance(model_or_uri, nn.Module):
        return model_or_uri, {}, type(model_or_uri).__name__
    uri = resolve_model(str(model_or_uri))
    model, meta = load_model(uri, storage_options=storage_options)
    return model, meta, uri


def evaluate_model(
    model_or_uri: nn.Module | str,
    manifest_uri: str,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: bool = False,
    *,
    fusion: str = "mean",
    tta: TTASettings | None = None,
    max_pixels: int | None = None,
    crf_params: CRFParams | None = None,
    crf_backend: str = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 4,
    num_model_actors: int = 1,
    crf_workers: int = 1,
    device: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
    progress_every_s: float = 30.0,
) -> dict:
    """Metrics of ``model_or_uri`` (a model, or any URI ``pipelines.tracking.load_model``
    takes; the current MLflow tracking URI resolves registry URIs) on the masked rows of
    ``manifest_uri``.

    Test-time augmentation: ``tta``, else ``TTASettings(scales, flip, fusion)``. With ``crf``, the
    parameters are ``crf_params``, else a registered version's tuned set (its ``crf.*`` tags), else
    the defaults - the same resolution as pipelines/segment.py.
    Returns ``segmentation_metrics`` (``mIoU, pixel_acc, mean_acc, fw_iou, per_class_iou``) plus
    ``num_images`` (scored) and ``num_errors``. Normalisation is the checkpoint's (``meta``), else
    ``mean``/``std``, else ImageNet's.
    """
    import ray

    ensure_ray()
    model, meta, model_uri = _load(model_or_uri, storage_options)
    meta = dict(meta)
    if mean is not None:
        meta["mean"] = list(mean)
    if std is not None:
        meta["std"] = list(std)
    params = crf_settings.for_model(crf_params, model_uri)[0] if crf else crf_params or CRFParams()
    listing = list_inputs(manifest_uri, storage_options, check_ids=False)  # nothing is written
    items = [item for item in listing.items if item.mask_uri]
    if not items:
        raise ValueError(f"{manifest_uri}: no rows with a mask_uri to evaluate on")
    gpu = use_gpu(device)
    plan = InferencePlan.for_model(
        model, meta, gpu=gpu, crf_backend=crf_backend, tta=tta or TTASettings(tuple(scales), flip, fusion),
        max_pixels=max_pixels, crf=crf, crf_params=params, table=False, score=True, overlays=False,
        max_input_pixels=DEFAULT_MAX_INPUT_PIXELS, storage_options=storage_options)
    ds = build_dataset(items, plan, ray.put(model), batch_size=batch_size,
                       num_model_actors=num_model_actors, cpus_per_model_actor=1.0,
                       crf_workers=crf_workers, gpu=gpu, write=None)
    tally = consume(ds, len(items), progress_every_s, label="evaluate")
    if tally.scored == 0:
        raise RuntimeError(f"{manifest_uri}: all {len(items)} masked rows failed ({tally.errors_by_stage})")
    metrics = segmentation_metrics(tally.cms[CM])
    metrics.update(num_images=tally.scored, num_errors=tally.errors + len(listing.errors))
    return metrics
