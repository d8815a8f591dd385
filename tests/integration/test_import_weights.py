"""import_weights.py end to end: a VainF checkpoint on (moto) S3 -> evaluated on Ray -> registered on
a real MLflow server -> loaded back with the same logits -> accepted by promote.py as first champion."""

from __future__ import annotations

import hashlib
import json
import uuid

import mlflow
import pytest
import s3fs
import torch

from deeplab_core.synthetic import SyntheticSpec
from deeplab_core.weights import from_vainf
from pipelines import import_weights, promote, segment
from pipelines.tracking import load_model
from pipelines.data.synthetic import write_synthetic_voc
from pipelines.promotion.policy import DEFAULT_ALIAS
from pipelines.tracking import tracking_uri_set
from tests.unit.test_peer_weights import (
    SIZE,
    VainFModel,
    perturb_batchnorm,
    relative_difference,
    vainf_checkpoint,
)

NUM_CLASSES = 6  # the synthetic scenes' classes
SPEC = SyntheticSpec(num_classes=NUM_CLASSES, height=48, width=64)


@pytest.fixture
def vainf_on_s3(s3_bucket, s3_options):
    torch.manual_seed(0)
    reference = VainFModel("deeplabv3plus", "mobilenetv2", NUM_CLASSES, 16)
    perturb_batchnorm(reference)
    checkpoint = vainf_checkpoint(reference.eval())
    assert "backbone.high_level_features.4.conv.0.0.weight" in checkpoint["model_state"]  # VainF's real layout
    uri = f"{s3_bucket}/peers/best_deeplabv3plus_mobilenet_synth_os16.pth"
    with s3fs.S3FileSystem(**s3_options).open(uri, "wb") as f:
        torch.save(checkpoint, f)
    return uri, checkpoint, reference


def test_vainf_from_s3_registered_evaluated_and_promoted(ray_cluster, mlflow_server, s3_server, s3_options, s3_bucket,
                                                         vainf_on_s3, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # the job's storage options come from AWS_*
    uri, checkpoint, reference = vainf_on_s3
    manifest = write_synthetic_voc(f"{s3_bucket}/synth", 0, 2, SPEC, seed=1, storage_options=s3_options)["val_manifest"]
    name = f"imported-{uuid.uuid4().hex[:8]}"

    code = import_weights.main(["vainf", uri, "--arch", "deeplabv3plus", "--backbone", "mobilenetv2",
                                "--num-classes", str(NUM_CLASSES), "--output-stride", "16", "--register", name,
                                "--tracking-uri", mlflow_server.url, "--eval", manifest, "--no-pytorch-flavor"])
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])  # after the evaluation's progress lines
    assert code == 0 and summary["model_uri"] == f"models:/{name}/1"

    tags = MlflowClient(mlflow_server.url, mlflow_server.url).get_model_version(name, "1").tags
    with s3fs_open(uri, s3_options) as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert (tags["source.kind"], tags["source.file"], tags["source.sha256"]) == (
        "vainf", "best_deeplabv3plus_mobilenet_synth_os16.pth", digest)
    assert tags["val_manifest"] == manifest
    assert 0.0 <= float(tags["val_mIoU"]) <= 1.0 and float(tags["val_mIoU"]) == pytest.approx(summary["val_mIoU"], abs=1e-6)
    assert (tags["arch"], tags["backbone"]) == ("deeplabv3plus", "mobilenetv2")

    with tracking_uri_set(mlflow_server.url):
        registered, meta = load_model(f"models:/{name}/1")
        flavors = mlflow.models.get_model_info(f"models:/{name}/1").flavors
    assert set(flavors) == {"python_function"}  # --no-pytorch-flavor: no torch.export
    assert meta["source"]["sha256"] == digest and meta["num_classes"] == NUM_CLASSES
    converted = from_vainf(checkpoint, "deeplabv3plus", "mobilenetv2", NUM_CLASSES, output_stride=16).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        ours = registered(x)
        assert torch.equal(ours, converted(x))  # the round trip through MLflow changes no bit
        assert relative_difference(ours, reference(x)) < 1e-5

    # Promotion measures it on the operator's manifest itself (its weights checked), first champion.
    assert promote.main(["--model", name, "--candidate", "1", "--tracking-uri", mlflow_server.url,
                         "--val-manifest", manifest]) == 0
    assert MlflowClient(mlflow_server.url, mlflow_server.url).get_registered_model(name).aliases == {DEFAULT_ALIAS: "1"}
    assert "evaluating" in capsys.readouterr().err

    # The batch job runs it from the registry (normalisation from the checkpoint's meta).
    masks = f"{s3_bucket}/masks"
    assert segment.main(["--model", f"models:/{name}@{DEFAULT_ALIAS}", "--input", manifest, "--output", masks,
                         "--scales", "1", "--no-flip", "--no-crf", "--tracking-uri", mlflow_server.url]) == 0
    fs = s3fs.S3FileSystem(**s3_options)
    fs.invalidate_cache()
    assert len(fs.glob(f"{masks}/masks/*.png")) == 2


def s3fs_open(uri: str, options: dict):
    return s3fs.S3FileSystem(**options).open(uri, "rb")
