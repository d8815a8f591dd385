"""The batch-segmentation job end to end on the session Ray cluster and moto S3.

One tiny untrained DeepLabv3+ (MobileNetV2 x0.25) checkpoint and eight 64 x 96 synthetic scenes.
The first run writes everything (masks, overlays, results, errors, evaluation table, MLflow run)
and later tests check what it left; the kill test runs the entry script as a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deeplab_core.constants import CRFParams
from deeplab_core.synthetic import SyntheticSpec
from pipelines.data.manifest import read_manifest, write_manifest
from pipelines.data.storage import get_fs
from pipelines.data.synthetic import write_synthetic_voc
from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.io import (
    finished_ids,
    read_results,
)
from pipelines.segmentation.job import run_segmentation
from tests.helpers import untrained_checkpoint

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 8
SPEC = SyntheticSpec(height=64, width=96)
SCALES = (0.75, 1.0)  # multi-scale, but cheap
UNSAFE_IDS = ["../escape", "a/../../b", "/etc/passwd", "s3://other/x", "C:evil", "back\\slash",
              "nul\x00byte", "a//b", "./here", "trailing/"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bucket(s3_options) -> str:
    import s3fs

    name = f"seg-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**s3_options).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt"), SPEC.num_classes)


@pytest.fixture(scope="module")
def manifest(bucket, s3_options) -> str:
    """8 good scenes with masks, one corrupt JPEG, and rows whose ids would escape the output."""
    data = write_synthetic_voc(f"{bucket}/data", 0, NUM_IMAGES, SPEC, seed=3, storage_options=s3_options)
    rows = read_manifest(data["val_manifest"], s3_options).to_pylist()
    fs, _ = get_fs(bucket, s3_options)
    corrupt = f"{bucket}/data/JPEGImages/corrupt.jpg"
    fs.pipe_file(corrupt, b"\xff\xd8\xff\xe0 this is not really a JPEG")
    rows.append({"id": "corrupt", "image_uri": corrupt, "mask_uri": rows[0]["mask_uri"]})
    rows += [{"id": bad, "image_uri": rows[0]["image_uri"], "mask_uri": None} for bad in UNSAFE_IDS]
    return write_manifest(rows, f"{bucket}/data/manifests/segment.parquet", s3_options)


@pytest.fixture(scope="module")
def first_run(ray_cluster, bucket, manifest, checkpoint, s3_options, tmp_path_factory):
    tracking = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    cfg = SegmentConfig(
        model=checkpoint, input=manifest, output=f"{bucket}/out", scales=SCALES, flip=True,
        crf=True, crf_params=CRFParams(iterations=3), overlays=True, batch_size=3, crf_workers=2,
        evaluate=True, tracking_uri=tracking, storage_options=s3_options,
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = run_segmentation(cfg)
    return cfg, report, stdout.getvalue()


def list_keys(uri: str, options: dict) -> list[str]:
    fs, path = get_fs(uri, options)
    try:
        return sorted(p[len(path.rstrip("/")) + 1:] for p in fs.find(path))
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------- pure parts


# --------------------------------------------------------------------------- end to end


def test_first_run_accounts_for_every_input(first_run):
    _, report, stdout = first_run
    assert report.read == NUM_IMAGES + 1 + len(UNSAFE_IDS)
    assert (report.ok, report.skipped) == (NUM_IMAGES, 0)
    assert report.errors == 1 + len(UNSAFE_IDS)
    assert report.read == report.ok + report.errors + report.skipped
    assert report.errors_by_stage == {"image": 1, "id": len(UNSAFE_IDS)}
    assert "read 19 = ok 8 + errors 11 + skipped 0" in stdout


def test_first_run_writes_masks_overlays_results_and_errors(first_run, s3_options):
    cfg, report, _ = first_run
    keys = list_keys(cfg.output, s3_options)
    ids = [f"synth_{i:06d}" for i in range(NUM_IMAGES)]
    assert [k for k in keys if k.startswith("masks/")] == [f"masks/{i}.png" for i in ids]
    assert [k for k in keys if k.startswith("overlays/")] == [f"overlays/{i}.jpg" for i in ids]
    assert any(k.startswith("results/") for k in keys) and any(k.startswith("errors/") for k in keys)
    assert "_state.json" in keys
    # One results file and one ledger file for the run, not one per batch.
    assert [k for k in keys if k.startswith(("results/", "ledger/"))] == [
        f"ledger/{report.run_id}.parquet", f"results/{report.run_id}.parquet"]
    # Nothing escaped: every key is one of the layout's, under the output prefix.
    assert all(k.split("/")[0] in ("masks", "overlays", "results", "errors", "ledger", "_lease", "_state.json")
               for k in keys)
    bucket_keys = list_keys(cfg.output.rsplit("/", 1)[0], s3_options)
    assert not any("escape" in k or "passwd" in k or "evil" in k for k in bucket_keys)

    fs, _ = get_fs(cfg.output, s3_options)
    with fs.open(get_fs(f"{cfg.output}/masks/{ids[0]}.png", s3_options)[1], "rb") as f:
        mask = Image.open(f)
        mask.load()
    assert mask.mode == "P" and mask.size == (SPEC.width, SPEC.height)
    assert int(np.asarray(mask).max()) < SPEC.num_classes

    results = read_results(cfg.output, s3_options)
    rows = {r["id"]: r for r in results.to_pylist()}
    assert sorted(rows) == sorted(ids + ["corrupt"] + UNSAFE_IDS)
    good = rows[ids[0]]
    assert good["status"] == "ok" and good["output_uri"] == f"{cfg.output}/masks/{ids[0]}.png"
    assert good["overlay_uri"] == f"{cfg.output}/overlays/{ids[0]}.jpg"
    assert good["classes"] == sorted(np.unique(np.asarray(mask)).tolist())
    assert good["seconds_model"] > 0 and good["seconds_crf"] > 0 and good["seconds_decode"] > 0
    assert good["model_uri"] == cfg.model and good["run_id"] == report.run_id
    assert good["crf_backend"] == "pydensecrf"  # auto on a CPU cluster
    assert rows["corrupt"]["status"] == "error" and rows["corrupt"]["output_uri"] is None

    error_rows = []
    for key in (k for k in keys if k.startswith("errors/")):
        with fs.open(get_fs(f"{cfg.output}/{key}", s3_options)[1], "rb") as f:
            error_rows += pq.read_table(f).to_pylist()
    by_id = {e["id"]: e for e in error_rows}
    assert set(by_id) == {"corrupt", *UNSAFE_IDS}
    assert by_id["corrupt"]["stage"] == "image" and by_id["corrupt"]["uri"].endswith("corrupt.jpg")
    assert by_id["../escape"]["stage"] == "id"


def test_eval_prints_the_table_and_logs_to_mlflow(first_run):
    import mlflow

    cfg, report, stdout = first_run
    assert set(report.evaluation) == {"plain", "+ multi-scale + flip", "+ dense CRF"}
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    lines, per_class = lines[:5], lines[5:]
    assert lines[0] == "| variant | scales | flip | CRF | mIoU | mAcc | aAcc | images |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["plain", "+ multi-scale + flip", "+ dense CRF"]
    assert "| 0.75,1 | yes | yes (3 it) |" in lines[4]
    assert all(line.rstrip().endswith(f"| {NUM_IMAGES} |") for line in lines[2:])  # corrupt one not scored
    # Then the IoU of each class, one row per class of the model.
    assert per_class[0] == "| class | IoU plain | IoU + multi-scale + flip | IoU + dense CRF |"
    assert len(per_class) == 2 + len(report.evaluation["plain"]["per_class_iou"])
    for row, name in zip(lines[2:], report.evaluation):
        miou = float(row.split("|")[5])
        assert miou == pytest.approx(100 * report.evaluation[name]["mIoU"], abs=0.006)
        assert 0 < report.evaluation[name]["pixel_acc"] <= 1

    client = mlflow.MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["images_ok"] == NUM_IMAGES and metrics["images_errors"] == 1 + len(UNSAFE_IDS)
    assert metrics["mIoU_msf_crf"] == pytest.approx(report.evaluation["+ dense CRF"]["mIoU"])
    assert runs[0].data.params["crf_backend"] == "pydensecrf"
    # the session's cluster is joined: engine auto runs on it; the default runtime
    assert (runs[0].data.params["engine"], runs[0].data.params["runtime"]) == ("ray", "torch")
    assert (report.engine, report.runtime) == ("ray", "torch")
    assert {"mIoU_plain", "mIoU_msf"} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"evaluation.md", "summary.json"} <= artifacts


def test_rerun_skips_every_finished_image(first_run, s3_options):
    cfg, _, _ = first_run
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = run_segmentation(cfg)
    # Undecodable files and unusable ids are permanent errors: settled, not tried again.
    assert (report.ok, report.errors, report.skipped) == (0, 0, NUM_IMAGES + 1 + len(UNSAFE_IDS))
    assert report.read == report.ok + report.errors + report.skipped
    results = read_results(cfg.output, s3_options)
    assert results.num_rows == len(set(results.column("id").to_pylist()))
    # finished_ids (an audit: results rows and masks) tells a deleted mask; runs go by the ledger.
    fs, path = get_fs(f"{cfg.output}/masks/synth_000003.png", s3_options)
    fs.rm(path)
    assert "synth_000003" not in finished_ids(cfg.output, s3_options)
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_segmentation(cfg.model_copy(update={"retry_errors": True})).errors == 1 + len(UNSAFE_IDS)


def test_evaluate_model_agrees_with_the_job_table(first_run, checkpoint, manifest, s3_options):
    from pipelines.tracking import load_model
    from pipelines.segmentation.evaluation import evaluate_model

    cfg, report, _ = first_run
    model, _ = load_model(checkpoint)
    metrics = evaluate_model(model, manifest, scales=SCALES, flip=True, crf=True,
                             crf_params=CRFParams(iterations=3), storage_options=s3_options)
    # Only masked rows are evaluated; ids matter only as output keys, so just the corrupt one fails.
    assert metrics["num_images"] == NUM_IMAGES and metrics["num_errors"] == 1
    assert metrics["mIoU"] == pytest.approx(report.evaluation["+ dense CRF"]["mIoU"], abs=1e-9)
    assert {"pixel_acc", "mean_acc", "fw_iou", "per_class_iou"} <= set(metrics)

    # The torch CRF inside the model actor (no CRF stage): the same model, so the same score.
    in_actor = evaluate_model(model, manifest, scales=SCALES, flip=True, crf=True, crf_backend="torch",
                              crf_params=CRFParams(iterations=3), storage_options=s3_options)
    assert in_actor["num_images"] == NUM_IMAGES
    assert in_actor["mIoU"] == pytest.approx(metrics["mIoU"], abs=0.005)


# --------------------------------------------------------------------------- resume (the schedule: test_schedule.py)


def kill_after_a_checkpoint(cmd: list[str], env: dict[str, str], output: str, options: dict) -> None:
    """Runs `cmd` and SIGKILLs it (the driver dies without any clean-up) once its first ledger
    checkpoint is on the output."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list_keys(f"{output}/ledger/pending", options):  # at least one batch recorded
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_killed_run_resumes_without_holes_or_duplicates(ray_cluster, s3_server, s3_options, bucket, checkpoint):
    count = 16
    data = write_synthetic_voc(f"{bucket}/kill-data", 0, count, SPEC, seed=5, storage_options=s3_options)
    output = f"{bucket}/kill-out"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    cmd = [sys.executable, "pipelines/segment.py", "--model", checkpoint, "--input", data["val_manifest"],
           "--output", output, "--batch-size", "1", "--crf-workers", "1", "--crf-iterations", "10",
           "checkpoint_every_s=0.01", "lease_ttl_s=3"]
    kill_after_a_checkpoint(cmd, env, output, s3_options)
    masks_at_kill = len(list_keys(f"{output}/masks", s3_options))
    assert 0 < masks_at_kill < count

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = run_segmentation(SegmentConfig(
            model=checkpoint, input=data["val_manifest"], output=output, crf_params=CRFParams(iterations=10),
            batch_size=4, storage_options=s3_options, lease_wait_s=60))  # the killed run's lease expires
    assert report.errors == 0 and report.skipped > 0 and report.ok + report.skipped == count

    ids = [f"synth_{i:06d}" for i in range(count)]
    assert list_keys(f"{output}/masks", s3_options) == [f"{i}.png" for i in ids]
    view = read_results(output, s3_options).to_pylist()
    assert sorted(r["id"] for r in view) == ids  # one row per input: no holes, no duplicates
    assert all(r["status"] == "ok" for r in view)
    assert finished_ids(output, s3_options) == set(ids)


def test_killed_in_process_run_keeps_its_checkpoints_and_the_next_run_goes_to_ray(
        ray_cluster, s3_server, s3_options, bucket, checkpoint, monkeypatch):
    count = 12
    data = write_synthetic_voc(f"{bucket}/kill-local-data", 0, count, SPEC, seed=7, storage_options=s3_options)
    output = f"{bucket}/kill-local-out"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "pipelines/segment.py", "--model", checkpoint, "--input", data["val_manifest"],
           "--output", output, "--batch-size", "1", "--engine", "local", "--scales", "0.5,0.75,1,1.25,1.5,1.75",
           "--crf-backend", "torch", "--crf-iterations", "10", "checkpoint_every_s=0.01", "lease_ttl_s=3"]
    kill_after_a_checkpoint(cmd, env, output, s3_options)  # the lease is never released
    recorded = len(list_keys(f"{output}/ledger/pending", s3_options))
    assert recorded > 0 and len(list_keys(f"{output}/masks", s3_options)) < count

    # engine auto off a cluster would run these 12 in-process, but a run on this output died:
    # Ray (the session cluster here), whose guard turns an input that kills its worker into an error.
    monkeypatch.setattr("pipelines.segmentation.engine.attached_to_cluster", lambda: False)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = run_segmentation(SegmentConfig(
            model=checkpoint, input=data["val_manifest"], output=output, scales=(0.5, 0.75, 1, 1.25, 1.5, 1.75),
            crf_backend="torch", crf_params=CRFParams(iterations=10), storage_options=s3_options, lease_wait_s=60))
    assert "segmenting on Ray (--engine auto: the last run on this output died" in stdout.getvalue()
    assert report.errors == 0 and report.skipped >= recorded and report.ok + report.skipped == count
    assert sorted(r["id"] for r in read_results(output, s3_options).to_pylist()) == [
        f"synth_{i:06d}" for i in range(count)]  # no holes, no duplicates
