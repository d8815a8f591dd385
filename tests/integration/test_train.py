"""The training job end to end on the session's real Ray cluster, moto S3 and sqlite MLflow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from pipelines.training.config import TrainConfig, load_train_config
from pipelines.training.job import build_trainer, run_training
from pipelines.training.loop import LOOP_CONFIG_REF

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Tiny but real: DeepLabv3+ on MobileNetV2 x0.25, 64x80 crops of the synthetic scenes.
TINY = [
    "model.arch=deeplabv3plus", "model.backbone=mobilenetv2", "model.num_classes=6",
    "model.options={width_mult: 0.25, separable: false}", "data.crop_size=64", "optim.batch_size=8",
    # SGD as calibrated below (the embedded demo, which overrides start from, trains with AdamW).
    "optim.name=sgd", "optim.base_lr=0.02", "optim.head_lr_mult=10", "optim.weight_decay=0.0001",
    "optim.warmup_iters=0", "scaling.num_workers=2", "run.log_every=10",
    # The torch.export of the registered model (~10 s) only where a test loads it.
    "tracking.pytorch_flavor=false",
    # An easier variant of the synthetic scenes (distinct class colours, no clutter), so a tiny
    # model learns them in ~100 iterations; the default scenes need ~1500 (docs/data.md).
    "data.synthetic.options={colour_spread: 0.2, clutter: 0, noise_std: 2.0, min_object_size: 0.3}",
]


def tiny_config(root: str, storage: str, tracking: str, name: str, extra: list[str]) -> TrainConfig:
    cfg = load_train_config(None, TINY + [f"data.root={root}", f"run.storage_path={storage}", f"run.name={name}",
                                    f"tracking.tracking_uri={tracking}"] + extra)
    return cfg


@pytest.fixture(scope="module")
def untrained_miou(ray_cluster, tmp_path_factory):
    """Val mIoU of the same tiny network with no training (max_iters=1 at a zero learning rate is
    not expressible, so evaluate a freshly built model directly)."""
    import ray

    from deeplab_core import build_model
    from deeplab_core.metrics import confusion_matrix, segmentation_metrics
    from deeplab_core.transforms import normalize
    from pipelines.training.job import prepare_manifests

    root = str(tmp_path_factory.mktemp("untrained") / "data")
    cfg = tiny_config(root, "unused", "null", "untrained", ["data.synthetic.num_train=8", "data.synthetic.num_val=16"])
    _, val_manifest = prepare_manifests(cfg)
    from pipelines.data.streams import eval_dataset

    import numpy as np
    import torch

    # The network rank 0 starts from (seeded as the training loop seeds it), so the baseline does
    # not move from run to run (unseeded it ranged 0.013-0.087).
    torch.manual_seed(cfg.run.seed)
    model = build_model(**{**cfg.model.build_kwargs(), "pretrained": None}).eval()

    cm = np.zeros((6, 6), dtype=np.int64)
    with torch.inference_mode():
        for row in eval_dataset(val_manifest, 6).iter_rows():
            pred = model(normalize(row["image"], cfg.data.mean, cfg.data.std)[None]).argmax(1)[0]
            cm += confusion_matrix(pred, torch.as_tensor(row["mask"]), 6)
    assert ray.is_initialized()
    return segmentation_metrics(cm)["mIoU"]


def test_training_on_s3_improves_miou_tracks_and_registers(ray_cluster, s3_bucket, s3_options, tmp_path,
                                                           untrained_miou):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = json.dumps(s3_options)
    # Data and checkpoints on S3 (what a cluster needs); a checkpoint between validations at 50/100.
    cfg = tiny_config(f"{s3_bucket}/synthetic", f"{s3_bucket}/ray_results", tracking, "tiny-s3", [
        "data.synthetic.num_train=48", "data.synthetic.num_val=16", "optim.max_iters=120",
        "run.val_every=60", "run.checkpoint_every=50", f"data.storage_options={options}",
        "tracking.pytorch_flavor=true", "tracking.register=always",  # 120 iterations: a trial for auto
    ])
    outcome = run_training(cfg)

    assert outcome.metrics["iteration"] == 120
    trained = outcome.metrics["val_mIoU"]
    print(f"untrained mIoU {untrained_miou:.3f} -> trained {trained:.3f}")
    # Calibrated here (easy scenes, MobileNetV2 x0.25, 120 iterations): trained 0.146-0.283 (Ray
    # Data's order and DDP are not bit-reproducible; the low end under load); an all-background
    # prediction scores ~0.12, a run that does not learn stays at the untrained score (~0.01).
    assert trained > untrained_miou + 0.06 and trained > 0.13

    client = mlflow.MlflowClient(tracking)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "deeplabv3plus"
    # Credentials never reach MLflow: the secret is redacted in params.
    assert all("testing" not in value for value in run.data.params.values())
    assert run.data.params["data.storage_options.secret"] == "***"
    # Nor Ray Train's run state (dashboard, state API), which publishes train_loop_config: that
    # is a redacted copy, the workers get the real one through the object store.
    secret_uri = "http://trainer:s3cr3t-pw@mlflow.example:5000"
    trainer = build_trainer(cfg, outcome.val_manifest, outcome.val_manifest, secret_uri, outcome.run_id)
    shown = json.dumps(trainer.train_loop_config, default=str)
    assert "s3cr3t-pw" not in shown and '"secret": "testing"' not in shown and "trainer:***@" in shown
    import ray

    real = ray.get(trainer.train_loop_config[LOOP_CONFIG_REF])
    assert real["tracking_uri"] == secret_uri and real["train"]["data"]["storage_options"]["secret"] == "testing"
    history = client.get_metric_history(outcome.run_id, "loss")
    assert len(history) == 12 and history[-1].value < history[0].value
    assert {"lr", "images_per_s", "data_wait_s", "val_mIoU", "val_fw_iou"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "validation")}
    assert any(p.endswith(".png") for p in artifacts) and any(p.endswith(".jpg") for p in artifacts)

    # The checkpoint registered and named on the summary line is the best validated one, with
    # its own score and its full s3:// URI, and it is on S3.
    best = max(client.get_metric_history(outcome.run_id, "val_mIoU"), key=lambda m: m.value)
    assert outcome.checkpoint_metrics["iteration"] == best.step
    assert outcome.checkpoint_path.startswith(f"{s3_bucket}/ray_results/tiny-s3/checkpoint_")
    assert (f"[train] val mIoU {best.value:.4f} at iteration {best.step}; checkpoint {outcome.checkpoint_path};"
            in outcome.summary_line())
    import s3fs

    assert s3fs.S3FileSystem(**s3_options).exists(f"{outcome.checkpoint_path}/model.pt")

    version = client.get_model_version("deeplab", outcome.model_version)
    assert float(version.tags["val_mIoU"]) == pytest.approx(best.value, abs=1e-5)
    assert version.tags["val_manifest"] == outcome.val_manifest
    # The first version named the registered model's reference set: promote.py needs no flag.
    assert client.get_registered_model("deeplab").tags["val_manifest"] == outcome.val_manifest

    # The registered model loads back (weights_only) and predicts the right shape.
    from pipelines.tracking import load_model

    mlflow.set_tracking_uri(tracking)
    model, meta = load_model(f"models:/deeplab/{outcome.model_version}")
    assert meta["num_classes"] == 6 and model.config["backbone"] == "mobilenetv2"
    # ... and as PyTorch (a torch.export program, any image size) and pyfunc (uint8 images in).
    import numpy as np
    import torch

    exported = mlflow.pytorch.load_model(f"models:/deeplab/{outcome.model_version}")
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))
    pyfunc = mlflow.pyfunc.load_model(f"models:/deeplab/{outcome.model_version}")
    assert tuple(pyfunc.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, -1, -1, 3)
    assert pyfunc.predict(np.zeros((1, 40, 48, 3), np.uint8)).shape == (1, 40, 48)

    # One number per model: re-validating the registered checkpoint (the batch job's evaluation
    # path, plain inference) gives its val_mIoU tag; every rank validated with rank 0's BN buffers.
    from pipelines.segmentation.evaluation import evaluate_model

    revalidated = evaluate_model(model, outcome.val_manifest, storage_options=s3_options)
    assert revalidated["mIoU"] == pytest.approx(float(version.tags["val_mIoU"]), abs=1e-5)

    # Same name + storage path resumes: the run is complete, so it reports the final state again
    # without training, into the same MLflow run, and registers nothing new.
    again = run_training(cfg)
    assert again.metrics["start_iteration"] == 120 and again.metrics["iteration"] == 120
    assert again.run_id == outcome.run_id
    assert again.model_version == outcome.model_version  # not registered twice
    assert len(client.search_model_versions("name = 'deeplab'")) == 1
    # The resumed run's final validation is not logged a second time at the same step.
    steps = [m.step for m in client.get_metric_history(outcome.run_id, "val_mIoU")]
    assert sorted(steps) == [60, 120], steps


def _kill_one_worker_after_checkpoints(storage: Path, name: str, stop: threading.Event, killed: list,
                                       dashboard_url: str):
    from ray.util.state import list_actors

    while not stop.is_set():
        # Wait for the second checkpoint: by then the first is surely registered with the
        # controller, so the restart must resume from iteration >= 10.
        if len(list((storage / name).glob("checkpoint_*"))) >= 2:
            # An explicit address: other Ray clusters on the machine make auto-detection fail.
            workers = list_actors(address=dashboard_url,
                                  filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
                return
        time.sleep(0.3)


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    storage = tmp_path / "ray_results"
    name = f"kill-{uuid.uuid4().hex[:6]}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Validation only at the end: every checkpoint before it comes from run.checkpoint_every.
    cfg = tiny_config(str(tmp_path / "data"), str(storage), tracking, name, [
        "data.synthetic.num_train=24", "data.synthetic.num_val=8", "optim.max_iters=60",
        "run.val_every=60", "run.checkpoint_every=10", "run.log_every=5", "run.max_failures=2",
        "tracking.registered_model=null",
    ])
    stop, killed, errors = threading.Event(), [], []

    def killer_main():
        try:
            _kill_one_worker_after_checkpoints(storage, name, stop, killed, ray_cluster.dashboard_url)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    killer = threading.Thread(target=killer_main)
    killer.start()
    try:
        outcome = run_training(cfg)
    finally:
        stop.set()
        killer.join()
    assert not errors, errors
    assert killed, "no worker was killed: the test did not exercise the failure path"
    assert outcome.metrics["iteration"] == 60
    # The restarted group resumed from a checkpoint, not from scratch.
    start = outcome.metrics["start_iteration"]
    assert 10 <= start < 60 and start % 10 == 0
    # The iterations redone after the restart did not log their steps a second time.
    steps = [m.step for m in mlflow.MlflowClient(tracking).get_metric_history(outcome.run_id, "loss")]
    assert sorted(steps) == list(range(5, 61, 5)), steps


def test_ray_job_submit_runs_the_train_script(ray_cluster, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = TINY + [
        f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'ray_results'}", "run.name=job",
        f"tracking.tracking_uri={tracking}", "data.synthetic.num_train=16", "data.synthetic.num_val=8",
        "optim.max_iters=10", "run.val_every=10",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.dashboard_url}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO), "--",
           "python", "pipelines/train.py", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    assert "[train] val mIoU" in proc.stdout
    # Rank 0's progress lines reach the job's console: iteration, percent done (eta until the end).
    assert "[train] it 10/10 (100%) loss" in proc.stdout, proc.stdout[-4000:]
    runs = mlflow.MlflowClient(tracking).search_runs([mlflow.MlflowClient(tracking).get_experiment_by_name("deeplab").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_too_few_rows_for_one_batch_per_worker_stops_at_once(ray_cluster, tmp_path, capsys):
    """3 usable rows, 2 workers x batch 4: one clear line and exit 2, never a loop without progress."""
    from pipelines import train

    start = time.monotonic()
    code = train.main(TINY + [f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}",
                              "tracking.tracking_uri=null", "data.synthetic.num_train=3",
                              "data.synthetic.num_val=4"])
    assert code == 2 and time.monotonic() - start < 120
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 3 usable row(s), fewer than the 8 needed" in err[0], err



def test_a_worker_failure_is_one_line_naming_the_innermost_cause(ray_cluster, tmp_path, capsys):
    """An exception inside the Train workers ends the job with one line: the worker's rank and the
    innermost exception of its chain (Ray's transport drops the chain: without remember_failure
    the line would name the wrapping ValueError), never a cut traceback."""
    import torch

    from pipelines import train

    pickled = tmp_path / "pickled-objects.pt"  # not tensors: weights-only loading refuses it
    torch.save({"model": object()}, pickled)
    code = train.main(TINY + [f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}",
                              "tracking.tracking_uri=null", "data.synthetic.num_train=8", "data.synthetic.num_val=2",
                              "optim.max_iters=2", "run.max_failures=0", f"model.pretrained={pickled}"])
    assert code == 1
    # (stderr also carries the shared cluster's forwarded worker logs: the job's own line is the one.)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py: error:")]
    assert len(err) == 1, err
    assert re.fullmatch(r"train\.py: error: train worker rank \d: UnpicklingError: Weights only load failed\. .* "
                        r"\(--debug shows the traceback\)", err[0]), err[0]
    assert "Traceback" not in err[0] and 'File "' not in err[0] and "WorkerGroupError" not in err[0]
