"""A shared cluster's defences, live on loopback: weights swapped after registration are refused,
a Ray head with token auth runs only jobs that carry the token, an MLflow server with basic-auth
lets only the right user register and promote."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pipelines import segment, tracking
from pipelines.tracking import WEIGHTS_TAG
from tests.servers import BIN, RayHead

TINY = {"arch": "deeplabv3plus", "backbone": "mobilenetv2", "num_classes": 3, "width_mult": 0.25}


def one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def tiny_checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    import torch

    from deeplab_core import build_model
    from pipelines.common.checkpoints import MODEL_FILE, save_checkpoint_dir

    torch.manual_seed(seed)
    return save_checkpoint_dir(build_model(**TINY).eval(), tmp_path / f"ckpt{seed}") / MODEL_FILE


def register_tiny(tracking_uri: str, tmp_path: Path, name: str) -> str:
    """A version registered the way training and import do it; returns its number."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    return tracking.log_checkpoint_model(tracking_uri, run_id, tiny_checkpoint(tmp_path), name, {}, {},
                                         pytorch_flavor=False)


def test_weights_replaced_through_the_artifact_proxy_are_refused(mlflow_server, tmp_path, capsys):
    import mlflow
    import requests

    name = f"deeplab-{uuid.uuid4().hex[:8]}"
    version = register_tiny(mlflow_server.url, tmp_path, name)
    client = mlflow.MlflowClient(mlflow_server.url)
    assert len(client.get_model_version(name, version).tags[WEIGHTS_TAG]) == 64
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (24, 16), (120, 30, 200)).save(images / "a.png")
    # Anyone who reaches the server (no auth) overwrites the version's model.pt through its proxy.
    location = client.get_model_version_download_uri(name, version).removeprefix("mlflow-artifacts:")
    other = tiny_checkpoint(tmp_path, seed=1).read_bytes()
    url = f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts{location}/artifacts/model.pt"
    assert requests.put(url, data=other, timeout=30).status_code == 200
    with tracking.tracking_uri_set(mlflow_server.url), pytest.raises(Exception, match="do not match"):
        mlflow.pyfunc.load_model(f"models:/{name}/{version}")  # the pyfunc flavour checks too
    capsys.readouterr()  # MLflow's download progress

    code = segment.main(["--model", f"models:/{name}/{version}", "--input", str(images),
                         "--output", str(tmp_path / "out"), "--tracking-uri", mlflow_server.url])
    line = one_error_line(capsys, code)
    assert line.startswith(f"segment.py: error: weights of models:/{name}/{version} do not match its "
                           f"{WEIGHTS_TAG} tag")
    assert not (tmp_path / "out" / "masks").exists()


# --------------------------------------------------------------------------- Ray token auth


def ray_job_submit(head, env: dict[str, str], home: Path) -> subprocess.CompletedProcess:
    """`ray job submit` of a one-line job from a clean environment (HOME without ~/.ray/auth_token)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--",
         "python", "-c", "print('ran-on-the-cluster')"],
        env={**base, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **env},
        capture_output=True, text=True, timeout=180)


def test_a_ray_head_with_token_auth_runs_only_jobs_that_carry_the_token(tmp_path):
    """Its own small head (the session's cluster runs without auth and is left alone)."""
    token = secrets.token_hex(32)
    home = tmp_path / "home"
    home.mkdir()
    head = RayHead(num_cpus=1, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(home)})
    try:
        head.start(tmp_path / "head.log")
        for _ in range(4):  # on a busy machine the head's job agent comes up after its dashboard
            accepted = ray_job_submit(head, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, home)
            if "No available agent" not in accepted.stderr:
                break
            time.sleep(5)
        refused = ray_job_submit(head, {"RAY_AUTH_MODE": "disabled"}, home)
        wrong = ray_job_submit(head, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}, home)
    finally:
        head.stop()
    assert accepted.returncode == 0, (accepted.stdout + accepted.stderr)[-3000:]
    assert "ran-on-the-cluster" in accepted.stdout
    for outsider in (refused, wrong):
        output = outsider.stdout + outsider.stderr
        assert outsider.returncode != 0 and "ran-on-the-cluster" not in output, output[-2000:]
        assert "401" in output or "uthenticat" in output, output[-2000:]
    assert token not in accepted.stdout + accepted.stderr + refused.stdout + refused.stderr
