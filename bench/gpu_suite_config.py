"""bench/gpu_suite.py's configuration and rows: which checks and measurements a run makes, at
which sizes, and the GPU peak table MFU is computed against."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS_FILE = "tests/unit/test_gpu_path.py"
CHECKS = {  # test function -> what the row says; tests/unit/test_gpu_suite_dry_run.py keeps it complete
    "test_bf16_channels_last_step_matches_fp32": "bf16 + channels_last training step = fp32 (loss, grad norm)",
    "test_batchnorm_in_a_one_process_group": "BatchNorm in a 1-process group (cuda: SyncBN/NCCL; cpu: gloo, plain BN)",
    "test_model_stage_bf16_matches_fp32": "batch job's model stage in bf16 autocast = fp32",
    "test_model_stage_replica_matches_job_stage": "model-stage replica = pipelines ModelStage (needs ray, pyarrow)",
    "test_torch_crf_matches_pydensecrf": "torch CRF labels = pydensecrf",
}
# Dense (no sparsity) BF16 tensor-core peaks in TFLOPS from NVIDIA's datasheets, which quote the
# sparse figure (2x) first: H100 SXM / H200 SXM 1,979 sparse -> 989.4; H100 PCIe 1,513 -> 756.5;
# H100 NVL / H200 NVL 1,671 -> 835.5; A100 624 -> 312; L40S 733 -> 362.05; L4 242 -> 121.
# Matched in this order against torch.cuda.get_device_name() (more specific names first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.5), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4),
    ("A100", 312.0), ("L40S", 362.05), ("L4", 121.0),
)
STATUS_GOOD = ("pass", "ok", "skipped")
MIN_PART_SECONDS = 10  # a part is not started with less of the suite's time left


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    backbone: str
    width_mult: float | None = None  # mobilenetv2 only

    @property
    def name(self) -> str:
        arch = {"deeplabv3plus": "DeepLabV3+", "deeplabv3": "DeepLabV3"}.get(self.arch, self.arch)
        width = f" x{self.width_mult:g}" if self.width_mult is not None else ""
        return f"{arch} {self.backbone}{width} (OS 16)"

    def build(self):
        from deeplab_core.models import build_model

        opts = {} if self.width_mult is None else {"width_mult": self.width_mult}
        return build_model(self.arch, self.backbone, num_classes=21, output_stride=16, **opts)


@dataclass(frozen=True)
class TrainSpec:
    key: str
    model: ModelSpec
    crop: int
    batch: int
    warmup: int
    steps: int
    max_timed_s: float  # the timed steps stop early past this


@dataclass(frozen=True)
class SegmentSpec:
    model: ModelSpec
    height: int
    width: int
    batch: int  # SegmentConfig.batch_size default: one same-size group per model call
    images: dict[str, int]  # images per variant
    max_timed_s: float


@dataclass(frozen=True)
class Config:
    device: str
    dry_run: bool
    threads: int
    train: list[TrainSpec]
    segment: SegmentSpec
    profile_model: ModelSpec
    profile_crop: int
    profile_batch: int
    budgets: dict[str, float]  # part -> seconds
    out_dir: str | None
    peak_tflops: float | None  # --peak-tflops override
    cudnn_benchmark: bool


def make_config(args: argparse.Namespace) -> Config:
    r101 = [ModelSpec("deeplabv3plus", "resnet101"), ModelSpec("deeplabv3", "resnet101")]
    tiny = [ModelSpec("deeplabv3plus", "mobilenetv2", 0.25), ModelSpec("deeplabv3", "mobilenetv2", 0.25)]
    if args.dry_run:
        train = [TrainSpec(f"train-{m.arch}", m, crop=65, batch=2, warmup=1, steps=2, max_timed_s=10) for m in tiny]
        segment = SegmentSpec(tiny[0], height=48, width=64, batch=2,
                              images={"plain": 2, "ms-flip": 2, "ms-flip-crf": 2}, max_timed_s=10)
        # ~10x what an idle 2-core box needs: shared CI machines run at load 15-25
        budgets = {"checks": 180, "train": 120, "ray": 240, "segment": 120, "profile": 120}
        profile = (tiny[0], 65, 2)
    else:
        train = [TrainSpec(f"train-{m.arch}", m, crop=513, batch=args.batch, warmup=5, steps=20, max_timed_s=30)
                 for m in r101]
        segment = SegmentSpec(r101[0], height=375, width=500, batch=4,
                              images={"plain": 64, "ms-flip": 16, "ms-flip-crf": 16}, max_timed_s=30)
        budgets = {"checks": 120, "train": 150, "ray": 150, "segment": 120, "profile": 60}
        profile = (r101[0], 513, args.batch)
    return Config(device=args.device, dry_run=args.dry_run, threads=args.threads, train=train, segment=segment,
                  profile_model=profile[0], profile_crop=profile[1], profile_batch=profile[2], budgets=budgets,
                  out_dir=os.environ.get("OUT") or None, peak_tflops=args.peak_tflops,
                  cudnn_benchmark=args.cudnn_benchmark)


def config_from_json(data: dict) -> Config:
    def model(d: dict) -> ModelSpec:
        return ModelSpec(**d)

    data = dict(data)
    data["train"] = [TrainSpec(**{**t, "model": model(t["model"])}) for t in data["train"]]
    data["segment"] = SegmentSpec(**{**data["segment"], "model": model(data["segment"]["model"])})
    data["profile_model"] = model(data["profile_model"])
    return Config(**data)


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    part: str
    key: str
    label: str
    status: str = "pending"  # pass / fail / ok / skipped / timeout / error
    images_per_s: float | None = None
    ms: float | None = None  # per step (train) or per image (segment)
    tflops: float | None = None
    mfu_pct: float | None = None
    peak_mib: float | None = None
    seconds: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Part:
    name: str
    rows: list[Row]  # the rows this part is expected to fill, in table order; decided rows are not run


def expected_rows(cfg: Config, ray_state: str, profile: bool) -> list[Part]:
    """Every row of the table, decided before anything runs, so a part that dies or times out
    still shows each row it owed."""
    devices = ["cpu"] + (["cuda"] if cfg.device == "cuda" else [])
    checks = [Row("checks", f"{name}[{d}]", f"{label} [{d}]") for name, label in CHECKS.items() for d in devices]
    train = [Row("train", t.key, f"{t.model.name}, {t.crop}x{t.crop}, batch {t.batch}, bf16 + channels_last, "
                 "plain PyTorch") for t in cfg.train]
    first = cfg.train[0]
    ray = Row("ray", "ray-train", f"{first.model.name}, {first.crop}x{first.crop}, batch {first.batch}: Ray Train "
              "(1 worker) vs plain PyTorch (bench/train_throughput.py)")
    s = cfg.segment
    where = f"{s.model.name}, {s.width}x{s.height}, 21 classes, batch {s.batch}"
    segment = [Row("segment", "plain", f"model stage, plain (scale 1, no flip): {where}"),
               Row("segment", "ms-flip", f"model stage, 6 scales + flip: {where}"),
               Row("segment", "ms-flip-crf", f"model stage, 6 scales + flip + torch CRF (10 it.) on {cfg.device}: "
                                             f"{where}")]
    parts = [Part("checks", checks), Part("train", train)]
    if ray_state == "run":
        parts.append(Part("ray", [ray]))
    else:
        ray.status, ray.note = "skipped", ray_state
        parts.append(Part("ray", [ray]))
    parts.append(Part("segment", segment))
    if profile:
        parts.append(Part("profile", [Row("profile", "profile", f"torch.profiler, {cfg.profile_model.name} "
                                                                "training steps")]))
    return parts


def ray_state(mode: str, dry_run: bool) -> str:
    """'run', or why the Ray Train row is skipped."""
    if mode == "off":
        return "skipped: --ray off"
    if importlib.util.find_spec("ray") is None:
        return "skipped: ray not installed (its wheel does not fit the GPU machine's 64 MiB carry)"
    if mode == "auto" and dry_run:
        return "skipped: --dry-run (Ray start-up alone exceeds the dry run's budget; --ray on to include it)"
    return "run"


def log(message: str) -> None:
    print(f"[gpu-suite] {message}", file=sys.stderr, flush=True)
