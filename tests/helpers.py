"""Small helpers shared by unit and integration tests."""

from __future__ import annotations

from pipelines.data.storage import get_fs


def put_placeholders(root_uri: str, options, relative_paths: list[str]) -> None:
    """Files with placeholder bytes at `relative_paths` under `root_uri` (importers only list)."""
    fs, base = get_fs(root_uri, options)
    for relative in relative_paths:
        path = f"{base}/{relative}"
        if fs.protocol[0] in ("file", "local"):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"placeholder")


def untrained_checkpoint(folder, num_classes: int) -> str:
    """A tiny seeded DeepLabv3+ / MobileNetV2 x0.25 checkpoint directory (segmentation tests)."""
    import torch

    from deeplab_core.models import build_model
    from pipelines.data.checkpoints import save_checkpoint_dir

    torch.manual_seed(0)
    model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=num_classes,
                        width_mult=0.25, output_stride=16)
    return str(save_checkpoint_dir(model, folder, {"note": "untrained"}))


def register_checkpoint(tracking_uri: str, name: str, checkpoint_dir, alias: str | None = None) -> str:
    """The checkpoint directory logged to a fresh run and registered as a new version of `name`
    (created if needed) with its weights tag, as training registers one; returns
    `models:/<name>/<version>` (and points `alias` at it)."""
    from pathlib import Path

    import mlflow

    from pipelines.tracking import WEIGHTS_TAG, file_sha256

    client = mlflow.MlflowClient(tracking_uri)
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        client.create_registered_model(name)
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(checkpoint_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                          tags={WEIGHTS_TAG: file_sha256(Path(checkpoint_dir) / "model.pt")})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"


def run_off_cluster(script: str, cwd, timeout: float = 300) -> str:
    """A fresh Python running `script` with this repository importable and no RAY_ADDRESS (what a
    user's shell is, off a cluster); asserts it succeeded and returns its stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
