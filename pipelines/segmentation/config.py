"""The batch segmentation job's configuration (typed, YAML + dotted overrides like every job)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from deeplab_core.constants import DEFAULT_SCALES
from pipelines.common.config import Section
from pipelines.data.decode import DEFAULT_MAX_PIXELS
from pipelines.segmentation.crf_settings import CRFSettings
from pipelines.segmentation.io import parse_time

DEFAULT_EXPERIMENT = "deeplab-segmentation"


class SegmentConfig(Section):
    """What `pipelines/segment.py` runs; every default is defined here and only here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="models:/name@alias, models:/name/version, runs:/<id>/model, "
                                   "or a checkpoint dir/URI")
    input: str = Field(description="URI prefix of images, or a manifest (.parquet/.csv/.jsonl)")
    output: str = Field(description="output URI prefix (any fsspec URI)")
    scales: tuple[float, ...] = Field(DEFAULT_SCALES, min_length=1, description="test-time scales")
    flip: bool = Field(True, description="horizontal-flip averaging")
    fusion: Literal["mean", "max"] = Field("mean", description="how scales are fused: mean (v3/v3+) or max (v2 MSC)")
    max_pixels: int | None = Field(None, gt=0, description="memory budget: largest scaled image run whole; "
                                                           "bigger ones are tiled")
    crf: bool = Field(True, description="dense CRF")
    # Fields left unset come from the model version's tuned set (tags written by
    # pipelines/tune_crf.py) when the model is a models:/ URI, else from CRFParams' defaults.
    crf_params: CRFSettings = Field(default_factory=CRFSettings)
    overlays: bool = Field(False, description="also write colour overlays (overlays/<id>.jpg)")
    overlay_alpha: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(4, ge=1)
    num_model_actors: int = Field(1, ge=1)
    cpus_per_model_actor: float = Field(1.0, gt=0, description="CPU actors: torch threads per actor (ignored on GPU)")
    crf_workers: int = Field(2, ge=1, description="CRF processes running at once")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: one GPU per model actor when "
                                                                       "the cluster has GPUs")
    since: str | None = Field(None, description="prefix inputs only: files modified at/after this ISO time, or "
                                                "'last' (the watermark of the previous run in <output>/_state.json)")
    evaluate: bool = Field(False, description="with ground-truth masks (manifest mask_uri): mIoU table "
                                              "plain / +MS+flip / +CRF")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (for models:/ and runs:/ URIs, "
                                                       "and to log the run)")
    experiment: str = Field(DEFAULT_EXPERIMENT, description="MLflow experiment for the run")
    max_input_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="decompression-bomb guard for decoding")
    storage_options: dict[str, Any] | None = None  # merged over the AWS_* env options
    progress_every_s: float = Field(10.0, gt=0)

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {scales}")
        return scales

    @field_validator("since")
    @classmethod
    def _iso_or_last(cls, since: str | None) -> str | None:
        if since not in (None, "last"):
            try:
                parse_time(since)
            except ValueError:
                raise ValueError(f"since must be an ISO 8601 time or 'last', got {since!r}") from None
        return since
