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

import os
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from deeplab_core.transforms import TrainTransform
from pipelines import ingest
from pipelines.config import TrainConfig, flatten
from pipelines.model_io import MODEL_FILE, log_model_to_mlflow
from pipelines.storage import is_local, pyarrow_filesystem, redact, resolve_storage_options
from pipelines.training import train_loop_per_worker

RUN_NAME_TAG = "deeplab.run_name"
STORAGE_TAG = "deeplab.storage_path"


@dataclass
class TrainOutcome:
    run_id: str | None
    metrics: dict
    checkpoint_path: str | None
    model_version: str | None
    val_manifest: str


def absolute_tracking_uri(uri: str) -> str:
    """Ray workers do not share the driver's working directory: make sqlite paths absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _absolute_storage(path: str) -> str:
    return str(Path(path).resolve()) if is_local(path) else path


def prepare_manifests(cfg: TrainConfig) -> tuple[str, str]:
    """(train, val) clean manifests, with bad rows recorded under `<root>/validated/<split>/`."""
    options = resolve_storage_options(cfg.data.root, cfg.data.storage_options)
    if cfg.data.train_manifest is None:
        from deeplab_core.synthetic import SyntheticSpec
        from pipelines.synthetic_data import write_synthetic_voc

        syn = cfg.data.synthetic
        spec = SyntheticSpec(num_classes=cfg.model.num_classes, height=syn.height, width=syn.width, **syn.options)
        written = write_synthetic_voc(cfg.data.root, syn.num_train, syn.num_val, spec=spec, seed=syn.seed,
                                      storage_options=options)
        train_manifest, val_manifest = written["train_manifest"], written["val_manifest"]
    else:
        train_manifest, val_manifest = cfg.data.train_manifest, cfg.data.val_manifest
    clean = []
    for split, manifest in (("train", train_manifest), ("val", val_manifest)):
        out_dir = cfg.data.root.rstrip("/") + f"/validated/{cfg.run.name}/{split}"
        clean_uri, summary = ingest.validate_manifest(manifest, out_dir, cfg.model.num_classes,
                                                      storage_options=options, max_pixels=cfg.data.max_pixels)
        print(f"[data] {split}: {summary}", flush=True)
        if summary.ok == 0:
            raise RuntimeError(f"{split} manifest {manifest} has no usable rows; see {out_dir}/errors.parquet")
        clean.append(clean_uri)
    return clean[0], clean[1]


def start_or_resume_mlflow_run(cfg: TrainConfig, tracking_uri: str, storage_path: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    existing = mlflow.search_runs(
        [experiment.experiment_id], output_format="list", max_results=1,
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}' and tags.`{STORAGE_TAG}` = '{storage_path}'",
        order_by=["attributes.start_time DESC"],
    )
    if existing:  # the same Ray Train run (name + storage path): keep logging into its MLflow run
        print(f"[mlflow] resuming run {existing[0].info.run_id}", flush=True)
        return existing[0].info.run_id
    run = mlflow.MlflowClient().create_run(experiment.experiment_id, run_name=cfg.run.name,
                                           tags={RUN_NAME_TAG: cfg.run.name, STORAGE_TAG: storage_path})
    params = flatten(redact(cfg.model_dump(mode="json")))
    client = mlflow.MlflowClient()
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    print(f"[mlflow] run {run.info.run_id} in experiment {cfg.tracking.experiment!r}", flush=True)
    return run.info.run_id


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= cfg.scaling.num_workers
    return bool(cfg.scaling.use_gpu)


def build_trainer(cfg: TrainConfig, train_manifest: str, val_manifest: str, tracking_uri: str | None,
                  run_id: str | None) -> TorchTrainer:
    options = resolve_storage_options(cfg.data.root, cfg.data.storage_options)
    transform = TrainTransform(crop_size=cfg.data.crop_size, scale_range=(cfg.data.scale_min, cfg.data.scale_max),
                               flip_prob=cfg.data.flip_prob, mean=cfg.data.mean, std=cfg.data.std)
    datasets = {
        "train": ingest.train_dataset(train_manifest, transform, cfg.model.num_classes, storage_options=options),
        "val": ingest.eval_dataset(val_manifest, cfg.model.num_classes, storage_options=options),
    }
    storage_path = _absolute_storage(cfg.run.storage_path)
    storage_fs = None if is_local(storage_path) else pyarrow_filesystem(storage_path, options)
    if storage_fs is not None:
        storage_path = storage_path.split("://", 1)[1]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "mlflow_run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=_use_gpu(cfg),
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                         checkpoint_score_attribute="val_mIoU",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"]),
    )


def _register(cfg: TrainConfig, run_id: str, tracking_uri: str, checkpoint: ray.train.Checkpoint,
              metrics: dict, val_manifest: str) -> str | None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    name = cfg.tracking.registered_model
    if name is not None:
        # Idempotent: re-running a finished run must not register the same checkpoint twice.
        for version in mlflow.MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if version.tags.get("iteration") == str(metrics.get("iteration")):
                print(f"[mlflow] already registered as {name} version {version.version}", flush=True)
                return version.version
    with mlflow.start_run(run_id=run_id), checkpoint.as_directory() as ckpt_dir:
        mlflow.log_artifact(str(Path(ckpt_dir) / MODEL_FILE), "best_checkpoint")
        tags = {k: f"{v:.6f}" for k, v in metrics.items() if k.startswith("val_")}
        tags.update({"val_manifest": val_manifest, "iteration": str(metrics.get("iteration")),
                     "arch": cfg.model.arch, "backbone": str(cfg.model.backbone)})
        version = log_model_to_mlflow(ckpt_dir, cfg.tracking.registered_model, tags)
        for key, value in metrics.items():
            if key.startswith("val_"):
                mlflow.log_metric(f"best_{key}", value)
    if cfg.tracking.registered_model is None:
        return None
    print(f"[mlflow] registered {cfg.tracking.registered_model} version {version.version} "
          f"(val mIoU {metrics['val_mIoU']:.4f})", flush=True)
    return version.version


def ensure_ray(worker_cpus: int) -> None:
    """Connect to RAY_ADDRESS, or start a local Ray with enough logical CPUs that the Ray Data
    tasks still get some while the training workers hold theirs (else ingestion stalls)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, worker_cpus + 2), logging_level="WARNING")


def run_training(cfg: TrainConfig) -> TrainOutcome:
    ensure_ray(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    train_manifest, val_manifest = prepare_manifests(cfg)
    tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri) if cfg.tracking.tracking_uri else None
    run_id = None
    if tracking_uri:
        run_id = start_or_resume_mlflow_run(cfg, tracking_uri, _absolute_storage(cfg.run.storage_path))
    trainer = build_trainer(cfg, train_manifest, val_manifest, tracking_uri, run_id)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    scored = [(ckpt, metrics) for ckpt, metrics in (result.best_checkpoints or []) if "val_mIoU" in metrics]
    best = max(scored, key=lambda cm: cm[1]["val_mIoU"]) if scored else (result.checkpoint, result.metrics)
    version = None
    if run_id is not None:
        version = _register(cfg, run_id, tracking_uri, best[0], best[1], val_manifest)
        import mlflow

        mlflow.MlflowClient(tracking_uri).set_terminated(run_id, "FINISHED")
    print(f"[train] done: {result.metrics}", flush=True)
    return TrainOutcome(run_id, dict(result.metrics), best[0].path if best[0] else None, version, val_manifest)
