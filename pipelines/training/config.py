"""Typed training configuration: YAML file + dotted command-line overrides.

Every field has a default, so `TrainConfig()` alone is the embedded demo: a tiny DeepLabv3+ on the
synthetic dataset under ./data, local Ray, MLflow in ./mlflow.db. Presets in configs/ override
what they need. Unknown keys are errors (a typo must not silently train the wrong thing).

    cfg = load_train_config("configs/voc_deeplabv3plus_r101.yaml", ["optim.base_lr=0.01", "scaling.num_workers=8"])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from deeplab_core.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from pipelines.common.uris import DEFAULT_TRACKING_URI
from pipelines.common.config import Section, load_config


class ModelSection(Section):
    arch: str = "deeplabv3plus"
    backbone: str | None = "mobilenetv2"
    num_classes: int = Field(6, gt=1, le=IGNORE_INDEX)  # masks are uint8 and 255 means ignore
    output_stride: int | None = 16
    pretrained: str | None = None  # local path, fsspec URI, or "imagenet"
    aux: bool = False
    options: dict[str, Any] = Field(default_factory=dict)  # arch-specific build_model options

    @model_validator(mode="after")
    def _buildable(self) -> "ModelSection":
        # Checked here, not in a train worker after the cluster started.
        from deeplab_core.models import check_model_arguments

        check_model_arguments(self.arch, self.backbone, self.output_stride, self.aux, **self.options)
        return self

    def build_kwargs(self) -> dict[str, Any]:
        return {"arch": self.arch, "backbone": self.backbone, "num_classes": self.num_classes,
                "output_stride": self.output_stride, "pretrained": self.pretrained, "aux": self.aux,
                **self.options}


class SyntheticSection(Section):
    """Generate the synthetic dataset at `data.root` when the manifests are not given."""

    num_train: int = Field(160, ge=1)
    num_val: int = Field(32, ge=1)
    height: int = 96
    width: int = 128
    seed: int = 0
    # Extra deeplab_core.synthetic.SyntheticSpec fields (difficulty knobs such as colour_spread).
    options: dict[str, Any] = Field(default_factory=dict)


class DataSection(Section):
    root: str = "data/synthetic"
    train_manifest: str | None = None
    val_manifest: str | None = None
    synthetic: SyntheticSection | None = Field(default_factory=SyntheticSection)
    # Names for metrics, the confusion matrix and overlay legends; None: the synthetic scenes'
    # names, VOC's for 21 classes, Cityscapes' for 19, else class_0, class_1, ...
    class_names: list[str] | None = None
    crop_size: int = Field(513, gt=0)
    scale_min: float = Field(0.5, gt=0)
    scale_max: float = Field(1.5, gt=0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = 50_000_000
    # Endpoint/region/credentials for s3:// etc. Merged over the standard AWS environment variables;
    # redacted before anything is logged.
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "DataSection":
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min {self.scale_min} > scale_max {self.scale_max}")
        if (self.train_manifest is None) != (self.val_manifest is None):
            raise ValueError("give both data.train_manifest and data.val_manifest, or neither")
        if self.train_manifest is None and self.synthetic is None:
            raise ValueError("no data: set data.train_manifest/val_manifest or data.synthetic")
        return self


class OptimSection(Section):
    # sgd (momentum) is the papers' choice for ImageNet-initialised backbones; adamw learns a
    # randomly initialised one several times faster (docs/data.md, "Demo calibration").
    name: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = Field(0.007, gt=0)  # at the global batch below (v3/v3+ papers)
    head_lr_mult: float = 10.0
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    batch_size: int = Field(8, ge=1)  # global, across workers and accumulation steps
    grad_accum: int = Field(1, ge=1)
    max_iters: int = Field(300, ge=1)
    power: float = 0.9
    warmup_iters: int = Field(0, ge=0)
    warmup_factor: float = 0.1
    aux_weight: float = 0.4
    bootstrap_ratio: float | None = None


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: int = Field(1, ge=1)
    # Ray's placement of the workers: PACK fills a node first; SPREAD puts them on different nodes
    # (a lost node then costs fewer workers, and a test shows the cross-node path).
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    sync_bn: bool = True
    bf16: bool = True  # autocast on GPU only
    channels_last: bool = True  # GPU only


class RunSection(Section):
    name: str = "deeplab-demo"
    storage_path: str = "ray_results"  # local path or s3://; same name + path = resume
    # auto: resume a run of the same model/data config, refuse another; force: resume regardless
    resume: Literal["auto", "force"] = "auto"
    log_every: int = Field(10, ge=1)
    val_every: int = Field(400, ge=1)  # each validation also checkpoints
    checkpoint_every: int = Field(100, ge=1)  # the most iterations a lost worker costs
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)
    seed: int = 0
    num_overlays: int = 4
    # Local paths (storage, data, sqlite tracking) are on a filesystem every node mounts (NFS):
    # skip the multi-node check that refuses them (pipelines/common/cluster_paths.py).
    shared_fs: bool = False


TRIAL_MAX_ITERS = 200  # runs shorter than this are trials for tracking.register=auto


# `register` (the config key) shadows the `register` classmethod pydantic's BaseModel inherits
# from ABCMeta; nothing calls it on a config. Pydantic's warning about it would print in every job.
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingSection" shadows', category=UserWarning)


class TrackingSection(Section):
    tracking_uri: str | None = DEFAULT_TRACKING_URI  # None: no MLflow records
    experiment: str = "deeplab"
    registered_model: str | None = "deeplab"
    # Registering a new version of `registered_model`: always, never, or auto = unless the run is a
    # trial (optim.max_iters below TRIAL_MAX_ITERS: a quick try must not add versions of the
    # production model). The model is logged to the run either way.
    register: Literal["auto", "always", "never"] = "auto"
    # Also log the model as a torch.export program (mlflow.pytorch.load_model); ~10 s per export.
    pytorch_flavor: bool = True


class TrainConfig(Section):
    # The demo's model: MobileNetV2 x0.5 with separable ASPP/decoder convolutions, 3x cheaper per
    # step than x1.0 with dense ones, and learning faster per CPU-second (docs/data.md).
    model: ModelSection = Field(default_factory=lambda: ModelSection(options={"width_mult": 0.5, "separable": True}))
    # The embedded demo, calibrated in docs/data.md ("Demo calibration"): 1000 generated 96x128
    # scenes, 64 px crops (a third of the pixels of whole images, so 3x the samples per CPU-second;
    # evaluation runs on whole images), AdamW at 2e-2 (3e-3 learned 2x slower) for 1500 iterations.
    # A `data:` / `optim:` section in a YAML file starts from the paper defaults (crop 513, SGD).
    data: DataSection = Field(default_factory=lambda: DataSection(
        crop_size=64, synthetic=SyntheticSection(num_train=1000)))
    optim: OptimSection = Field(default_factory=lambda: OptimSection(
        name="adamw", base_lr=0.02, head_lr_mult=1.0, weight_decay=0.01, batch_size=16,
        max_iters=1500, warmup_iters=30))
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=lambda: RunSection(val_every=500))
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _check_batch(self) -> "TrainConfig":
        per_step = self.scaling.num_workers * self.optim.grad_accum
        if self.data.class_names is not None and len(self.data.class_names) != self.model.num_classes:
            raise ValueError(f"data.class_names has {len(self.data.class_names)} names for "
                             f"model.num_classes={self.model.num_classes}")
        if self.optim.batch_size % per_step:
            raise ValueError(f"optim.batch_size {self.optim.batch_size} must be divisible by "
                             f"num_workers x grad_accum = {per_step}")
        return self

    @property
    def class_names(self) -> list[str]:
        from deeplab_core.datasets import CITYSCAPES_CLASSES, VOC_CLASSES
        from deeplab_core.synthetic import CLASS_NAMES

        n = self.model.num_classes
        if self.data.class_names is not None:
            return list(self.data.class_names)
        if self.data.train_manifest is None and n <= len(CLASS_NAMES):
            return list(CLASS_NAMES[:n])
        known = {len(VOC_CLASSES): VOC_CLASSES, len(CITYSCAPES_CLASSES): CITYSCAPES_CLASSES}
        return list(known.get(n, [f"class_{i}" for i in range(n)]))

    @property
    def per_worker_batch(self) -> int:
        return self.optim.batch_size // (self.scaling.num_workers * self.optim.grad_accum)


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config: embedded defaults, then the YAML file, then `section.key=value` overrides.

    Without a file, overrides apply on top of the embedded demo field by field (so
    `optim.max_iters=2000` keeps the demo's optimizer); a file's sections replace the demo's whole.
    """
    base = TrainConfig().model_dump(mode="json") if path is None else None
    return load_config(TrainConfig, path, overrides, base)
