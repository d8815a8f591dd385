"""The registered MLflow model's PyTorch flavour is shipped only when it takes any input size."""

from __future__ import annotations

import logging

import mlflow
import torch

from deeplab_core.models import build_model
from pipelines import tracking
from pipelines.data.checkpoints import MODEL_FILE, save_checkpoint_dir


def _register(model, tmp_path, uri: str) -> str:
    checkpoint = save_checkpoint_dir(model, tmp_path / "ckpt", {"mean": [0.5] * 3, "std": [0.25] * 3})
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("logging")).info.run_id
    return tracking.log_checkpoint_model(uri, run_id, checkpoint / MODEL_FILE, "m", {}, {})


def test_a_size_specialised_export_is_left_out_with_a_warning(sqlite_tracking_uri, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # sqlite MLflow keeps artifacts under ./mlruns
    # DeepLabv2's multi-scale inputs are sized with Python ints: torch.export bakes in the size.
    model = build_model("deeplabv2", "resnet18", num_classes=3, msc_scales=[0.5, 0.75]).eval()
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        version = _register(model, tmp_path, sqlite_tracking_uri)
    with tracking.tracking_uri_set(sqlite_tracking_uri):
        info = mlflow.models.get_model_info(f"models:/m/{version}")
        labels = mlflow.pyfunc.load_model(f"models:/m/{version}").predict(
            torch.randint(0, 256, (1, 40, 52, 3), dtype=torch.uint8).numpy())
    assert set(info.flavors) == {"python_function"}  # the pyfunc model is still complete
    assert labels.shape == (1, 40, 52)
    assert any("without its PyTorch flavour" in r.getMessage() and "deeplabv2/resnet18" in r.getMessage()
               for r in caplog.records)


def test_the_pytorch_flavour_says_how_to_normalise(sqlite_tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=3, width_mult=0.25,
                        output_stride=16).eval()
    version = _register(model, tmp_path, sqlite_tracking_uri)
    with tracking.tracking_uri_set(sqlite_tracking_uri):
        info = mlflow.models.get_model_info(f"models:/m/{version}")
        module = mlflow.pytorch.load_model(f"models:/m/{version}")
    assert "pytorch" in info.flavors
    assert (info.metadata["input_mean"], info.metadata["input_std"], info.metadata["num_classes"]) == (
        [0.5] * 3, [0.25] * 3, 3)
    image = torch.randint(0, 256, (1, 3, 40, 48)).float() / 255
    normalised = (image - torch.tensor(info.metadata["input_mean"])[:, None, None]) / torch.tensor(
        info.metadata["input_std"])[:, None, None]
    with torch.no_grad():
        assert torch.allclose(module(normalised), model(normalised), atol=1e-4)
    # The flavour is a torch.export program (pickle-free): torch refuses .eval()/.train() on it.
    # Where a full nn.Module is wanted, the project's loader gives one from the same URI, its
    # weights checked against the version's digest.
    with tracking.tracking_uri_set(sqlite_tracking_uri):
        loaded, meta = tracking.load_model(f"models:/m/{version}")
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    assert loaded.train().training and not loaded.eval().training
    with torch.no_grad():
        assert torch.allclose(loaded.to("cpu")(normalised), module(normalised), atol=1e-4)
    assert (meta["mean"], meta["std"]) == ([0.5] * 3, [0.25] * 3)
