"""The batch segmentation job's configuration (typed, YAML + dotted overrides like every job)."""

from __future__ import annotations

from typing import Any, Literal

import dataclasses
from collections.abc import Mapping

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from deeplab_core.constants import TTASettings
from pipelines.common.config import Section
from pipelines.segmentation.crf_settings import CRFSettings
from pipelines.segmentation.io import parse_time

DEFAULT_EXPERIMENT = "deeplab-segmentation"
# Memory budget of one model actor. A scaled image above DEFAULT_TILE_PIXELS (a Cityscapes frame at
# scale 1) runs as overlapping tiles, so activations stay those of one such forward; the images
# themselves are capped at 4096 x 4096: at 21 classes their full-resolution probabilities alone are
# 1.4 GB in float32 (a 7000 x 7000 PNG of 6 KB took a worker past 8 GB before this cap).
DEFAULT_TILE_PIXELS = 2048 * 1024
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096
# engine auto: the most inputs run in this process. Measured (docs/segmentation.md, "Engines"): no
# crossover up to 1024 images on 2 cores, the in-process rate per image equals Ray's after Ray's
# 20-30 s start; above this the start is a small part of a run long enough to want Ray's guard.
DEFAULT_LOCAL_MAX_INPUTS = 1000
# ... and with the CPU (pydensecrf) CRF, which Ray runs in processes beside the model actor:
# measured (TTA + CRF, 500 x 375, load 2-6) 8 images 11.1 s here vs 36.5 s on Ray, 24 images 27.0
# vs 46.3: ~0.99 s per image serially here against ~0.61 on Ray after its start, so the two meet
# near 75 images; 32 keeps larger CRF jobs under Ray's guard and parallel CRF with room to spare.
DEFAULT_LOCAL_MAX_CRF_INPUTS = 32


class WithTTA(Section):
    """A config with the shared test-time augmentation settings (`tta`), which also knows which of
    them the user gave (`tta_given`: a registered version's recipe fills the others).

    `scales`, `flip`, `fusion` given at the top level (YAML files and `scales=` overrides from
    before `tta:` existed) go into `tta`."""

    tta: TTASettings = Field(default_factory=TTASettings, description="test-time augmentation")
    _tta_given: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _tta_section(cls, values: Any, handler: Any) -> Any:
        names = [f.name for f in dataclasses.fields(TTASettings)]
        given: frozenset[str] = frozenset()
        if isinstance(values, Mapping):
            moved = {name: values[name] for name in names if name in values}
            tta = values.get("tta")
            if dataclasses.is_dataclass(tta):  # a whole TTASettings counts as every field given
                given = frozenset(names)
            elif isinstance(tta, Mapping):
                given = frozenset(tta)
            if moved:
                tta = dict(tta or {}) if not dataclasses.is_dataclass(tta) else dataclasses.asdict(tta)
                values = {**{k: v for k, v in values.items() if k not in moved}, "tta": {**tta, **moved}}
                given |= frozenset(moved)
        config = handler(values)
        if given:
            config._tta_given = given
        return config

    @property
    def tta_given(self) -> frozenset[str]:
        return self._tta_given


class SegmentConfig(WithTTA):
    """What `pipelines/segment.py` runs; every default is defined here and only here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="models:/name@alias, models:/name/version, runs:/<id>/model, "
                                   "or a checkpoint dir/URI")
    input: str = Field(description="URI prefix of images, a manifest (.parquet/.csv/.jsonl), or a glob of "
                                   "manifests ('s3://b/feed/*.parquet': a feed of new keys, no image listing)")
    output: str = Field(description="output URI prefix (any fsspec URI)")
    max_pixels: int | None = Field(DEFAULT_TILE_PIXELS, gt=0, description="memory budget: largest scaled "
                                   "image run whole (pixels); bigger ones are tiled")
    crf: bool = Field(True, description="dense CRF")
    # Fields left unset come from the model version's tuned set (tags written by
    # pipelines/tune_crf.py) when the model is a models:/ URI, else from CRFParams' defaults.
    crf_params: CRFSettings = Field(default_factory=CRFSettings)
    crf_backend: Literal["auto", "pydensecrf", "torch"] = Field(
        "auto", description="auto: the torch CRF inside the model actor on GPU clusters, pydensecrf CPU tasks "
                            "otherwise (faster on CPU, bench/crf.py)")
    overlays: bool = Field(False, description="also write colour overlays (overlays/<id>.jpg)")
    overlay_alpha: float = Field(0.5, ge=0, le=1)
    batch_size: int = Field(4, ge=1)
    num_model_actors: int = Field(1, ge=1)
    cpus_per_model_actor: float = Field(1.0, gt=0, description="CPU actors: torch threads per actor, and of the "
                                        "in-process engine's model (ignored on GPU)")
    crf_workers: int = Field(2, ge=1, description="CRF processes running at once")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="model forwards: fp32, bf16 autocast, or auto (bf16 on GPUs; on CPUs as "
                            "pipelines/segmentation/precision.py decides). Scoring always runs fp32")
    runtime: Literal["torch", "onnx"] = Field(
        "torch", description="model stage runtime: torch (eager PyTorch), or onnx (the model exported once to ONNX, "
                             "checked against eager at two sizes, run by ONNX Runtime; CPU and fp32 only; needs "
                             "pip install 'deeplab-ray[onnx]')")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: one GPU per model actor when "
                                                                       "the cluster has GPUs")
    since: str | None = Field(None, description="prefix inputs only: only files modified at/after this ISO "
                                                "time; 'last' is the default schedule (every unsettled input, "
                                                "whatever its time), kept for older command lines")
    # The ledger (ledger.py) and its retries.
    max_attempts: int = Field(3, ge=1, description="runs that may retry an input's transient error (I/O, "
                                                   "worker lost) before it is recorded as permanent")
    reprocess_changed: bool = Field(True, description="process a settled input again when it is listed with "
                                                      "another size or etag (mtime where there is no etag)")
    redo: Literal["changed", "all", "none"] = Field(
        "changed", description="settled inputs made by another model or settings (provenance.py): changed = "
                               "segment them again (after a promotion too), none = keep them, all = redo every input")
    retry_errors: bool = Field(False, description="retry every recorded error in this run, permanent ones too")
    crash_limit: int = Field(2, ge=1, description="times one input may kill its worker process in a run before "
                                                  "it becomes an error record (stage named)")
    ledger_max_files: int = Field(8, ge=1, description="ledger files kept before they are compacted into one")
    checkpoint_every_s: float = Field(60.0, gt=0, description="a running run records its outcomes at least this "
                                                              "often (a killed run loses at most that)")
    # One run per output (lease.py).
    lease_ttl_s: float = Field(300.0, gt=0, description="a run's lease on the output expires this long after its "
                                                        "last heartbeat (heartbeats every third of it)")
    lease_wait_s: float = Field(0.0, ge=0, description="wait this long for another run's lease before exiting "
                                                       "busy (exit code 3)")
    evaluate: bool = Field(False, description="with ground-truth masks (manifest mask_uri): mIoU table "
                                              "plain / +MS+flip / +CRF")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (for models:/ and runs:/ URIs, "
                                                       "and to log the run)")
    experiment: str = Field(DEFAULT_EXPERIMENT, description="MLflow experiment for the run")
    max_input_pixels: int = Field(DEFAULT_MAX_INPUT_PIXELS, gt=0, description="largest image accepted "
                                  "(pixels); bigger ones become error records, not a worker's death")
    storage_options: dict[str, Any] | None = None  # merged over the AWS_* env options
    shared_fs: bool = Field(False, description="local input/output paths are on a filesystem every node "
                                               "mounts (NFS): skip the multi-node check that refuses them")
    progress_every_s: float = Field(10.0, gt=0)
    # Where the stages run (engine.py); outputs and ledger are the same either way.
    engine: Literal["auto", "ray", "local"] = Field(
        "auto", description="local: in this process, no Ray; ray: Ray Data; auto: in this process when not on a "
                            "cluster, for at most local_max_inputs inputs (local_max_crf_inputs with the CPU "
                            "pydensecrf CRF), and not right after a run on this output died")
    local_max_inputs: int = Field(DEFAULT_LOCAL_MAX_INPUTS, ge=0, description="engine auto: the most inputs "
                                  "segmented in this process")
    local_max_crf_inputs: int = Field(DEFAULT_LOCAL_MAX_CRF_INPUTS, ge=0, description="engine auto with the CPU "
                                      "(pydensecrf) CRF: the most inputs segmented in this process (above, Ray "
                                      "runs the CRF in parallel processes beside the model)")

    @model_validator(mode="after")
    def _onnx_runs_fp32_on_cpu(self) -> SegmentConfig:
        # runtime.py: the onnxruntime package has no CUDA provider and no bf16 autocast.
        if self.runtime == "onnx" and self.precision == "bf16":
            raise ValueError("runtime onnx runs float32 only: use precision fp32 or auto, or runtime torch")
        if self.runtime == "onnx" and self.device == "cuda":
            raise ValueError("runtime onnx runs on CPU only (no CUDA provider): use device cpu or auto, or runtime torch")
        return self

    @field_validator("since")
    @classmethod
    def _iso_or_last(cls, since: str | None) -> str | None:
        if since not in (None, "last"):
            try:
                parse_time(since)
            except ValueError:
                raise ValueError(f"since must be an ISO 8601 time or 'last', got {since!r}") from None
        return since
