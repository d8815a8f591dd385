"""The training job on the driver: data -> Ray Train -> MLflow run and registered model version.

1. Data: the configured manifests, or the synthetic dataset (generated once under data.root).
2. Validation pass over both manifests: bad rows become error records (errors.parquet beside the
   clean manifests) and the summary `read == ok + errors` is printed.
3. One MLflow run per (storage path, run name): a re-run of the same name resumes the Ray Train
   run from its latest checkpoint and keeps logging into the same MLflow run.
4. `TorchTrainer.fit()` with `FailureConfig(max_failures)`: a dead worker restarts the group from
   the latest checkpoint.
5. The best checkpoint (by val mIoU) is logged and registered as a new model version, tagged with
   its validation metrics and the validation manifest.
"""

from __future__ import annotations

import hashlib
import math
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import yaml
from ray.data import DataContext, ExecutionOptions
from ray.train.torch import TorchTrainer

from deeplab_core.transforms import TrainTransform
from pipelines import tracking
from pipelines.data.checkpoints import MODEL_FILE
from pipelines.common.cluster_paths import check_shared_paths
from pipelines.data.manifest import manifest_uris
from pipelines.common.errors import InputError
from pipelines.common.ray_session import ensure_ray, use_gpu
from pipelines.data import streams
from pipelines.common.redaction import redact
from pipelines.common.uris import absolute_uri, is_local, join_uri, protocol_of
from pipelines.data.storage import pyarrow_filesystem, resolve_storage_options
from pipelines.training.config import TRIAL_MAX_ITERS, TrainConfig
from pipelines.training.interrupt import TrainingStopped, abort_on_sigint, last_checkpoint_iteration, stopped_line
from pipelines.training.loop import LOOP_CONFIG_REF, train_loop_per_worker
from pipelines.training.resume import check_resume

RUN_NAME_TAG = "deeplab.run_name"
STORAGE_TAG = "deeplab.storage_path"


@dataclass
class TrainOutcome:
    run_id: str | None
    metrics: dict  # the last report's (iteration, start_iteration, val_* of the final validation)
    checkpoint_path: str | None  # the registered (best validated) checkpoint's full URI
    model_version: str | None
    val_manifest: str
    checkpoint_metrics: dict = field(default_factory=dict)  # that checkpoint's report

    def summary_line(self) -> str:
        scored = self.checkpoint_metrics or self.metrics
        registered = f"model version {self.model_version}" if self.model_version else "not registered"
        return (f"[train] val mIoU {scored.get('val_mIoU', float('nan')):.4f} at iteration "
                f"{scored.get('iteration')}; checkpoint {self.checkpoint_path}; {registered}")


def print_config(cfg: TrainConfig) -> None:
    """The resolved config as YAML, secrets redacted."""
    print(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False))


def absolute_tracking_uri(uri: str) -> str:
    """Ray workers do not share the driver's working directory: make sqlite paths absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _absolute_storage(path: str) -> str:
    return str(Path(path).resolve()) if is_local(path) else path


def ray_storage(storage_path: str, options: Mapping[str, Any] | None) -> tuple[str, Any]:
    """`RunConfig`'s (storage_path, storage_filesystem): a local path made absolute and no
    filesystem; for a URI, the path inside it and the pyarrow filesystem built from the storage
    options (so endpoint and credentials reach every node, not only the driver's environment)."""
    if is_local(storage_path):
        return _absolute_storage(storage_path), None
    filesystem, path = pyarrow_filesystem(storage_path, options)
    return path, filesystem


def checkpoint_uri(cfg: TrainConfig, checkpoint: ray.train.Checkpoint | None) -> str | None:
    """The full URI of a checkpoint: Ray's `Checkpoint.path` is inside its filesystem, so an
    `s3://` storage path comes back as `bucket/key`."""
    if checkpoint is None:
        return None
    if is_local(cfg.run.storage_path):
        return checkpoint.path
    return f"{protocol_of(cfg.run.storage_path)}://{checkpoint.path.lstrip('/')}"


def prepare_manifests(cfg: TrainConfig) -> tuple[str, str]:
    """(train, val) clean manifests, with bad rows recorded under `<root>/validated/<split>/`."""
    options = resolve_storage_options(cfg.data.root, cfg.data.storage_options)
    if cfg.data.train_manifest is None:
        from deeplab_core.synthetic import SyntheticSpec
        from pipelines.data.synthetic import write_synthetic_voc

        syn = cfg.data.synthetic
        spec = SyntheticSpec(num_classes=cfg.model.num_classes, height=syn.height, width=syn.width, **syn.options)
        written = write_synthetic_voc(cfg.data.root, syn.num_train, syn.num_val, spec=spec, seed=syn.seed,
                                      storage_options=options)
        train_manifest, val_manifest = written["train_manifest"], written["val_manifest"]
    else:
        train_manifest, val_manifest = cfg.data.train_manifest, cfg.data.val_manifest
    clean = []
    for split, manifest in (("train", train_manifest), ("val", val_manifest)):
        out_dir = validated_dir(cfg, split, manifest)
        clean_uri, summary = streams.validate_manifest(manifest, out_dir, cfg.model.num_classes,
                                                      storage_options=options, max_pixels=cfg.data.max_pixels)
        print(f"[data] {split}: {summary}", flush=True)
        check_enough_rows(cfg, split, manifest, summary.ok, f"{out_dir}/errors.parquet")
        clean.append(clean_uri)
    return clean[0], clean[1]


def validated_dir(cfg: TrainConfig, split: str, manifest: str) -> str:
    """Where the clean manifest of `manifest` goes: named by what defines it (the source manifest,
    classes, pixel cap), not by the run, so every run on the same data validates into - and tags
    its model versions with - the same canonical manifest that promotion compares on."""
    key = f"{absolute_uri(manifest)}|{cfg.model.num_classes}|{cfg.data.max_pixels}"
    return cfg.data.root.rstrip("/") + f"/validated/{split}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def check_enough_rows(cfg: TrainConfig, split: str, manifest: str, usable: int, errors_uri: str) -> None:
    """Every worker must get at least one full batch per pass (training drops the last partial
    batch), else the loop could never make progress; validation needs a row per worker."""
    workers = cfg.scaling.num_workers
    needed = workers * cfg.per_worker_batch if split == "train" else workers
    if usable < needed:
        what = (f"{workers} worker(s) x a per-worker batch of {cfg.per_worker_batch}" if split == "train"
                else f"one row for each of {workers} worker(s)")
        raise InputError(f"{split} manifest {manifest} has {usable} usable row(s), fewer than the {needed} "
                         f"needed ({what}); add rows, or lower optim.batch_size / scaling.num_workers "
                         f"(bad rows are listed in {errors_uri})")


def start_or_resume_mlflow_run(cfg: TrainConfig, tracking_uri: str, storage_path: str,
                               manifests: dict[str, str]) -> str:
    """One MLflow run per (run name, storage path): a re-run keeps logging into the same run."""
    run_id, resumed = tracking.find_or_create_run(
        tracking_uri, cfg.tracking.experiment, cfg.run.name,
        identity={RUN_NAME_TAG: cfg.run.name, STORAGE_TAG: storage_path},
        params=cfg.model_dump(mode="json"))
    if not resumed:
        tracking.log_dataset_inputs(tracking_uri, run_id, manifests)
    what = "resuming run" if resumed else "run"
    print(f"[mlflow] {what} {run_id} in experiment {cfg.tracking.experiment!r}", flush=True)
    return run_id


def ingest_options() -> ExecutionOptions:
    """Train's default ingest options, given explicitly: its own default copies the deprecated
    `exclude_resources` too, which makes its dataset manager warn about it (RayDeprecationWarning)."""
    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                            verbose_progress=current.verbose_progress)


def build_trainer(cfg: TrainConfig, train_manifest: str, val_manifest: str, tracking_uri: str | None,
                  run_id: str | None, verbose: bool = False) -> TorchTrainer:
    options = resolve_storage_options(cfg.data.root, cfg.data.storage_options)
    transform = TrainTransform(crop_size=cfg.data.crop_size, scale_range=(cfg.data.scale_min, cfg.data.scale_max),
                               flip_prob=cfg.data.flip_prob, mean=cfg.data.mean, std=cfg.data.std)
    datasets = {
        "train": streams.train_dataset(train_manifest, transform, cfg.model.num_classes, storage_options=options),
        "val": streams.eval_dataset(val_manifest, cfg.model.num_classes, storage_options=options),
    }
    storage_path, storage_fs = ray_storage(cfg.run.storage_path, cfg.data.storage_options)
    loop_config = {"train": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "mlflow_run_id": run_id,
                   "verbose": verbose}
    return TorchTrainer(
        train_loop_per_worker,
        # Ray Train publishes train_loop_config in its run state (dashboard, state API): it shows a
        # redacted copy; the workers read the real one (storage secrets, a tracking URI with a
        # password) from the object store.
        train_loop_config={**redact(loop_config), LOOP_CONFIG_REF: ray.put(loop_config)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu(cfg.scaling.use_gpu, cfg.scaling.num_workers),
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                               placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                         checkpoint_score_attribute="val_mIoU",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            # Train's own "Requesting resources / Started worker group" lines only with --verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"], execution_options=ingest_options()),
    )


def registered_name(cfg: TrainConfig) -> str | None:
    """The model to register a version of (tracking.register: always / never / auto = unless a
    trial run, optim.max_iters < TRIAL_MAX_ITERS), saying so when a trial is not registered."""
    name, rule = cfg.tracking.registered_model, cfg.tracking.register
    if name is None or rule == "never":
        return None
    if rule == "auto" and cfg.optim.max_iters < TRIAL_MAX_ITERS:
        print(f"[mlflow] not registered as {name}: a trial run (optim.max_iters={cfg.optim.max_iters} < "
              f"{TRIAL_MAX_ITERS}; tracking.register=always registers it); the model is logged to the run", flush=True)
        return None
    return name


def _register(cfg: TrainConfig, run_id: str, tracking_uri: str, checkpoint: ray.train.Checkpoint,
              metrics: dict, val_manifest: str) -> str | None:
    name = registered_name(cfg)
    iteration = str(metrics.get("iteration"))
    if name is not None:
        existing = tracking.registered_version_of_run(tracking_uri, name, run_id, iteration)
        if existing is not None:
            print(f"[mlflow] already registered as {name} version {existing}", flush=True)
            return existing
    val_metrics = {k: v for k, v in metrics.items() if k.startswith("val_")}
    tags = {k: f"{v:.6f}" for k, v in val_metrics.items()}
    tags.update({"val_manifest": val_manifest, "iteration": iteration,
                 "arch": cfg.model.arch, "backbone": str(cfg.model.backbone)})
    with checkpoint.as_directory() as ckpt_dir:
        version = tracking.log_checkpoint_model(tracking_uri, run_id, Path(ckpt_dir) / MODEL_FILE, name,
                                                tags, val_metrics, cfg.tracking.pytorch_flavor)
    if version is not None:
        print(f"[mlflow] registered {name} version {version} (val mIoU {metrics['val_mIoU']:.4f})", flush=True)
    return version


def check_cluster_paths(cfg: TrainConfig) -> None:
    """On a multi-node cluster, refuses (one InputError) what the workers would read or write on
    the driver's disk only: storage path, data root, manifest rows, pretrained weights, sqlite."""
    pretrained = cfg.model.pretrained if cfg.model.pretrained != "imagenet" else None
    manifests = [m for m in (cfg.data.train_manifest, cfg.data.val_manifest) if m]
    check_shared_paths(
        {"run.storage_path": cfg.run.storage_path, "data.root": cfg.data.root, "model.pretrained": pretrained},
        {"tracking.tracking_uri": cfg.tracking.tracking_uri}, shared_fs=cfg.run.shared_fs,
        uris=manifest_uris(manifests, cfg.data.storage_options))


def run_training(cfg: TrainConfig, verbose: bool = False) -> TrainOutcome:
    if cfg.tracking.tracking_uri:
        tracking.check_reachable(absolute_tracking_uri(cfg.tracking.tracking_uri))
    check_cluster_paths(cfg)
    options = resolve_storage_options(cfg.run.storage_path, cfg.data.storage_options)
    if check_resume(cfg, join_uri(_absolute_storage(cfg.run.storage_path), cfg.run.name), options):
        print(f"[train] resuming run {cfg.run.name!r} (same model and data config)", flush=True)
    ensure_ray(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, verbose=verbose)
    train_manifest, val_manifest = prepare_manifests(cfg)
    tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri) if cfg.tracking.tracking_uri else None
    run_id = None
    if tracking_uri:
        run_id = start_or_resume_mlflow_run(cfg, tracking_uri, _absolute_storage(cfg.run.storage_path),
                                            {"training": train_manifest, "validation": val_manifest})
    trainer = build_trainer(cfg, train_manifest, val_manifest, tracking_uri, run_id, verbose)
    abort_on_sigint(trainer)
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except KeyboardInterrupt:  # Ctrl-C: the run was stopped, not failed; a re-run resumes it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if run_id is not None:
            tracking.finish_run(tracking_uri, run_id, "KILLED")
        run_dir = join_uri(_absolute_storage(cfg.run.storage_path), cfg.run.name)
        raise TrainingStopped(stopped_line(last_checkpoint_iteration(run_dir, options))) from None
    except BaseException:
        if run_id is not None:  # never leave the MLflow run RUNNING (or FINISHED) after a failure
            tracking.finish_run(tracking_uri, run_id, "FAILED")
        raise
    best_checkpoint, best_metrics = best_validated(result)
    version = None
    if run_id is not None:
        version = _register(cfg, run_id, tracking_uri, best_checkpoint, best_metrics, val_manifest)
        tracking.finish_run(tracking_uri, run_id)
    print(f"[train] done: {result.metrics}", flush=True)
    return TrainOutcome(run_id, dict(result.metrics), checkpoint_uri(cfg, best_checkpoint), version, val_manifest,
                        dict(best_metrics))


def best_validated(result: ray.train.Result) -> tuple[ray.train.Checkpoint, dict]:
    """The kept checkpoint with the highest val mIoU, and its metrics. Checkpoints taken between
    validations (`run.checkpoint_every`) report val_mIoU NaN and are never chosen; the run always
    ends with a validated one."""
    scored = [(ckpt, metrics) for ckpt, metrics in (result.best_checkpoints or [])
              if math.isfinite(metrics.get("val_mIoU", math.nan))]
    if not scored:
        return result.checkpoint, dict(result.metrics)
    return max(scored, key=lambda cm: cm[1]["val_mIoU"])
