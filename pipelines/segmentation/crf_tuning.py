"""Dense-CRF parameter search on Ray Tune, as the DeepLab papers cross-validated theirs.

    model probabilities on N masked images of a manifest, computed ONCE on the driver
    (predict_probs with the run's scales/flip and the checkpoint's normalisation, as ModelStage)
      -> object store (tune.with_parameters)
      -> one Tune trial per parameter set: dense CRF on every image, mIoU of the CRF labels
      -> the best set (the defaults are always one of the trials, so it is never worse than them)
      -> MLflow run (trials table + best/default scores), tags `crf.*` on the model version

`pipelines/segment.py` then uses the version's tuned set by default (crf_settings.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from deeplab_core.constants import CRFParams
from pipelines import tracking
from pipelines.common.console import is_verbose
from pipelines.common.errors import InputError
from pipelines.common.ray_session import ensure_ray
from pipelines.data.decode import DEFAULT_MAX_PIXELS
from pipelines.common.uris import absolute_uri
from pipelines.segmentation import crf_settings, recipe
from pipelines.segmentation.config import WithTTA
from pipelines.segmentation.crf_settings import TUNED_FIELDS
from pipelines.segmentation.pipeline import model_errors, resolve_model

DEFAULT_EXPERIMENT = "deeplab-crf-tuning"
METRIC = "mIoU"
# Random-search ranges (log-uniform) and grid-search axes (the defaults are added to each axis, so
# they are one grid point): CRFParams' field metadata, where the papers' ranges are noted.
RANGES: dict[str, tuple[float, float]] = {
    f.name: f.metadata["search"] for f in dataclasses.fields(CRFParams) if f.name in TUNED_FIELDS}
GRID: dict[str, tuple[float, ...]] = {
    f.name: f.metadata["grid"] for f in dataclasses.fields(CRFParams) if f.name in TUNED_FIELDS}


class TuneCRFConfig(WithTTA):
    """What `pipelines/tune_crf.py` runs."""

    model: str = Field(description="models:/name@alias or /version (tags are written on the version), "
                                   "or a checkpoint dir/URI (nothing is tagged)")
    manifest: str = Field(description="manifest with mask_uri: the tuning images")
    num_images: int = Field(8, ge=1, description="first N masked rows of the manifest")
    search: Literal["random", "grid"] = Field("random", description="random (num_samples sets, "
                                              "log-uniform in RANGES) or grid (GRID axes + defaults)")
    num_samples: int = Field(16, ge=1, description="random search: parameter sets, the defaults included")
    seed: int = 0
    iterations: int = Field(CRFParams.iterations, ge=1, description="mean-field iterations per trial")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once (default: one per CPU)")
    grid: dict[str, tuple[float, ...]] = Field(default_factory=lambda: dict(GRID))
    tag_version: bool = Field(True, description="store the best set on the model version")
    storage_path: str = Field("ray_results", description="Ray Tune's trial directory root")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (models:/ URIs, the run, tags)")
    experiment: str = DEFAULT_EXPERIMENT
    storage_options: dict[str, Any] | None = None
    max_input_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)

    @field_validator("grid")
    @classmethod
    def _grid_axes(cls, grid: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
        unknown = set(grid) - set(TUNED_FIELDS)
        if unknown:
            raise ValueError(f"unknown grid axes {sorted(unknown)}; choose from {list(TUNED_FIELDS)}")
        return grid


@dataclass(frozen=True)
class Trial:
    params: dict[str, float]
    mIoU: float
    pixel_acc: float
    is_default: bool


@dataclass(frozen=True)
class TuneResult:
    model_uri: str
    best: CRFParams
    best_score: float
    default_score: float
    no_crf_score: float  # the same images without the CRF (the probabilities' argmax)
    trials: list[Trial]
    run_id: str | None
    tagged: bool
    seconds: float


def default_point() -> dict[str, float]:
    defaults = CRFParams()
    return {name: float(getattr(defaults, name)) for name in TUNED_FIELDS}


def load_tuning_data(cfg: TuneCRFConfig, model_uri: str) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], int]:
    """[(image uint8 HxWx3, probs float16 CxHxW, gt uint8 HxW)] for the first `num_images`
    masked rows that decode, and the class count. The model runs here, once."""
    from deeplab_core.transforms import normalize
    from deeplab_core.tta import predict
    from pipelines.tracking import load_model
    from pipelines.data.manifest import read_manifest
    from pipelines.data.rows import RowDecoder
    from pipelines.data.checkpoints import normalisation_of, num_classes_of

    model, meta = load_model(model_uri, storage_options=cfg.storage_options)
    num_classes = num_classes_of(model)
    mean, std = normalisation_of(meta, model)
    rows = [r for r in read_manifest(cfg.manifest, cfg.storage_options).to_pylist() if r.get("mask_uri")]
    decoder = RowDecoder(cfg.storage_options, num_classes, cfg.max_input_pixels, require_masks=True)
    data = []
    for start in range(0, len(rows), cfg.num_images):  # a bad row is skipped; read on until N
        chunk = rows[start:start + cfg.num_images]
        for row in decoder.decode_rows([r["id"] for r in chunk], [r["image_uri"] for r in chunk],
                                       [r["mask_uri"] for r in chunk]):
            if row.error is not None or len(data) >= cfg.num_images:
                continue
            probs = predict(model, normalize(row.image, mean, std).unsqueeze(0), cfg.tta)[0]
            data.append((row.image, probs.numpy().astype(np.float16), row.mask))
        if len(data) >= cfg.num_images:
            break
    if not data:
        raise InputError(f"{cfg.manifest}: no decodable rows with a mask_uri to tune on")
    return data, num_classes


def score(data: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int,
          params: CRFParams | None) -> dict[str, float]:
    """mIoU / pixel accuracy of the CRF labels (params None: no CRF, the argmax) over `data`."""
    from deeplab_core.crf import refine
    from deeplab_core.metrics import confusion_matrix, segmentation_metrics

    cm = np.zeros((num_classes, num_classes), np.int64)
    for image, probs, gt in data:
        label = probs.argmax(0).astype(np.uint8) if params is None else refine([image], [probs], params)[0]
        cm += confusion_matrix(label, np.array(gt), num_classes)
    result = segmentation_metrics(cm)
    return {METRIC: float(result["mIoU"]), "pixel_acc": float(result["pixel_acc"])}


def _trial(config: dict[str, float], data: list, num_classes: int, iterations: int) -> None:
    """One Tune trial: the shared probabilities (from the object store) through one CRF set."""
    from ray import tune

    params = CRFParams(iterations=iterations, **{name: float(config[name]) for name in TUNED_FIELDS})
    tune.report(score(data, num_classes, params))


def search_space(cfg: TuneCRFConfig) -> tuple[dict[str, Any], Any, int]:
    """(param_space, search algorithm, num_samples) for the configured search."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    defaults = default_point()
    if cfg.search == "grid":
        axes = {name: sorted({*cfg.grid.get(name, ()), defaults[name]}) for name in TUNED_FIELDS}
        return {name: tune.grid_search(values) for name, values in axes.items()}, BasicVariantGenerator(), 1
    space = {name: tune.loguniform(*RANGES[name]) for name in TUNED_FIELDS}
    # The defaults run first and count as one of num_samples: the best is never worse than them.
    algorithm = BasicVariantGenerator(points_to_evaluate=[defaults], random_state=cfg.seed)
    return space, algorithm, cfg.num_samples


def run_search(cfg: TuneCRFConfig, data: list, num_classes: int) -> list[Trial]:
    """Every trial of the search; the data goes to the object store once (tune.with_parameters)."""
    from ray import tune

    space, algorithm, num_samples = search_space(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, data=data, num_classes=num_classes, iterations=cfg.iterations), {"cpu": 1})
    name = "tune-crf-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    if not is_verbose():
        # Tune's new output engine prints its configuration box and result paths even at
        # verbose=0; the legacy one is silent there. The job prints its own trial table.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=num_samples, search_alg=algorithm,
                                    max_concurrent_trials=cfg.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=absolute_uri(cfg.storage_path), verbose=0),
    )
    defaults = default_point()
    trials = []
    for result in tuner.fit():
        if result.error is not None or METRIC not in (result.metrics or {}):
            raise RuntimeError(f"CRF trial {result.config} failed: {result.error}")
        params = {name: float(result.config[name]) for name in TUNED_FIELDS}
        is_default = all(np.isclose(params[k], defaults[k]) for k in TUNED_FIELDS)
        trials.append(Trial(params, result.metrics[METRIC], result.metrics["pixel_acc"], is_default))
    return trials


def trials_table(trials: Sequence[Trial]) -> str:
    lines = ["| rank | " + " | ".join(TUNED_FIELDS) + " | mIoU | pixel acc | defaults |",
             "|---|" + "---|" * (len(TUNED_FIELDS) + 3)]
    for rank, trial in enumerate(sorted(trials, key=_rank_key, reverse=True), 1):
        values = " | ".join(f"{trial.params[k]:.3g}" for k in TUNED_FIELDS)
        lines.append(f"| {rank} | {values} | {100 * trial.mIoU:.2f} | {100 * trial.pixel_acc:.2f} | "
                     f"{'yes' if trial.is_default else ''} |")
    return "\n".join(lines)


def _rank_key(trial: Trial) -> tuple[float, bool]:
    return trial.mIoU, trial.is_default  # a tie keeps the defaults


def run_crf_tuning(cfg: TuneCRFConfig) -> TuneResult:
    """Runs the search; logs it, tags the version, prints and returns the result."""
    with tracking.tracking_uri_set(cfg.tracking_uri):
        return _run(cfg)


def _run(cfg: TuneCRFConfig) -> TuneResult:
    started = time.monotonic()
    cfg = cfg.model_copy(update={"manifest": absolute_uri(cfg.manifest)})
    with model_errors(cfg.model):  # an unknown name or alias is one line, before Ray starts
        model_uri = resolve_model(cfg.model)
    ensure_ray()
    cfg = recipe.applied(cfg, model_uri)  # scales / flip not given: the version's tta.* tags
    data, num_classes = load_tuning_data(cfg, model_uri)
    print(f"[tune_crf] {model_uri}: probabilities of {len(data)} image(s) computed once "
          f"(scales {','.join(f'{s:g}' for s in cfg.tta.scales)}, flip {cfg.tta.flip}); searching "
          f"({cfg.search}) with {cfg.iterations} CRF iterations per trial", flush=True)
    trials = run_search(cfg, data, num_classes)
    best_trial = max(trials, key=_rank_key)
    default_trials = [t for t in trials if t.is_default]
    if not default_trials:
        raise RuntimeError("the default CRF set was not among the trials")
    best = CRFParams(iterations=cfg.iterations, **best_trial.params)
    no_crf = score(data, num_classes, None)[METRIC]
    table = trials_table(trials)
    print(f"[tune_crf] {len(trials)} trials\n\n{table}\n", flush=True)
    tagged = False
    if cfg.tag_version and model_uri.startswith("models:/"):
        # The set is tuned for these scales' probabilities: they are stored with it (tta.*).
        tracking.set_model_version_tags(
            model_uri, {**crf_settings.tags_for(best, cfg.manifest, best_trial.mIoU, default_trials[0].mIoU),
                        **recipe.tags_for(cfg.tta.scales, cfg.tta.flip, "tune_crf")})
        tagged = True
    result = TuneResult(model_uri, best, best_trial.mIoU, default_trials[0].mIoU, no_crf, trials, None,
                        tagged, time.monotonic() - started)
    run_id = log_result(cfg, result, table) if cfg.tracking_uri else None
    result = dataclasses.replace(result, run_id=run_id)
    print(f"[tune_crf] best {crf_settings.params_json(best)}: mIoU {100 * result.best_score:.2f} vs defaults "
          f"{100 * result.default_score:.2f} (no CRF {100 * no_crf:.2f}) on {len(data)} image(s)"
          + (f"; stored on {model_uri} as tags crf.* with its scales as tta.*" if tagged else "")
          + (f"; MLflow run {run_id}" if run_id else ""), flush=True)
    return result


def log_result(cfg: TuneCRFConfig, result: TuneResult, table: str) -> str:
    params: Mapping[str, Any] = {
        "model": cfg.model, "model_resolved": result.model_uri, "manifest": cfg.manifest,
        "num_images": cfg.num_images, "search": cfg.search,
        "num_trials": len(result.trials), "iterations": cfg.iterations,
        "scales": ",".join(f"{s:g}" for s in cfg.tta.scales), "flip": cfg.tta.flip, "fusion": cfg.tta.fusion,
        "seed": cfg.seed,
    }
    metrics = {"best_mIoU": result.best_score, "default_mIoU": result.default_score,
               "no_crf_mIoU": result.no_crf_score, "seconds": result.seconds,
               **{f"best_{name}": float(getattr(result.best, name)) for name in TUNED_FIELDS}}
    trials = [asdict(t) for t in result.trials]
    return tracking.log_tuning_run(cfg.experiment, f"tune-crf-{result.model_uri.replace('/', '_')}",
                                   params, metrics, trials, table)
