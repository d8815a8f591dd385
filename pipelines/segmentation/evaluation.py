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

from deeplab_core.constants import CRFParams
from deeplab_core.metrics import segmentation_metrics
from pipelines.common.checkpoints import load_model
from pipelines.common.ray_session import ensure_ray, use_gpu
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.io import list_inputs
from pipelines.segmentation.job import build_dataset, make_plan, resolve_model
from pipelines.segmentation.report import consume


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
    """Metrics of ``model_or_uri`` (a model, or any URI ``model_io.load_model`` takes; the
    current MLflow tracking URI resolves registry URIs) on the masked rows of ``manifest_uri``.

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
    cfg = SegmentConfig(
        model=model_uri, input=manifest_uri, output="", scales=tuple(scales), flip=flip, fusion=fusion,
        max_pixels=max_pixels, crf=crf, crf_params=crf_params or CRFParams(), crf_backend=crf_backend,
        batch_size=batch_size,
        num_model_actors=num_model_actors, crf_workers=crf_workers, device=device,
        storage_options=storage_options,
    )
    listing = list_inputs(manifest_uri, storage_options, check_ids=False)  # nothing is written
    items = [item for item in listing.items if item.mask_uri]
    if not items:
        raise ValueError(f"{manifest_uri}: no rows with a mask_uri to evaluate on")
    gpu = use_gpu(device)
    plan = make_plan(cfg, model, meta, table=False, score=True, gpu=gpu)
    ds = build_dataset(items, plan, ray.put(model), batch_size=batch_size,
                       num_model_actors=num_model_actors, cpus_per_model_actor=1.0,
                       crf_workers=crf_workers, gpu=gpu, write=None)
    tally = consume(ds, len(items), progress_every_s, label="evaluate")
    if tally.scored == 0:
        raise RuntimeError(f"{manifest_uri}: all {len(items)} masked rows failed ({tally.errors_by_stage})")
    metrics = segmentation_metrics(tally.cms["cm"])
    metrics.update(num_images=tally.scored, num_errors=tally.errors + len(listing.errors))
    return metrics
