"""A shared cluster's defences, live on loopback: weights swapped after registration are refused,
a Ray head with token auth runs only jobs that carry the token, an MLflow server with basic-auth
lets only the right user register and promote."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
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
    from pipelines.data.checkpoints import MODEL_FILE, save_checkpoint_dir

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


# --------------------------------------------------------------------------- MLflow basic-auth

INFRA = Path(__file__).resolve().parents[2] / "infra"


@pytest.fixture
def auth_server(tmp_path):
    """`mlflow server --app-name basic-auth` with the ConfigMap's auth settings (user database on
    local disk), the admin from the environment as the Deployment takes it from its Secret."""
    import yaml

    from tests.servers import MlflowServer, free_port, http_ok, stop_process_group, wait_until

    config = yaml.safe_load((INFRA / "mlflow" / "configmap.yaml").read_text())["data"]["basic_auth.ini"]
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(config.replace("sqlite:////var/lib/mlflow-auth/basic_auth.db",
                                  f"sqlite:///{tmp_path / 'auth.db'}"))
    admin = {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(16),
             "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}  # CSRF key of the auth app
    server = MlflowServer(root=tmp_path / "mlflow")
    server.port = free_port()
    server.root.mkdir()
    cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(server.port), "--backend-store-uri", f"sqlite:///{server.root / 'mlflow.db'}",
           "--artifacts-destination", (server.root / "artifacts").as_uri(), "--workers", "1"]
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), **admin}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_")}
    with open(server.root / "server.log", "wb") as log:
        server.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                       start_new_session=True)
    try:
        wait_until(lambda: http_ok(f"{server.url}/health"), 120, "mlflow basic-auth server", server.proc)
        yield server, admin
    finally:
        stop_process_group(server.proc)


def as_user(monkeypatch, user: tuple[str, str] | None) -> None:
    """The MLflow client's own way to authenticate: MLFLOW_TRACKING_USERNAME/PASSWORD."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if user is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])


def test_mlflow_basic_auth_lets_only_the_trainer_register_and_promote(auth_server, ray_cluster, tmp_path,
                                                                      monkeypatch, capsys):
    import mlflow
    from mlflow.exceptions import MlflowException
    from PIL import Image

    from pipelines import promote
    from pipelines.tracking.promotion import error_share_tag, evaluation_tags

    server, admin = auth_server
    trainer = ("deeplab-trainer", secrets.token_urlsafe(16))
    reader = ("deeplab-reader", secrets.token_urlsafe(16))
    users = subprocess.run(
        [sys.executable, str(INFRA / "mlflow" / "users.py"), "--experiment", "train"],
        env={**os.environ, "MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": "admin",
             "MLFLOW_TRACKING_PASSWORD": admin["MLFLOW_AUTH_ADMIN_PASSWORD"],
             "TRAINER_USERNAME": trainer[0], "TRAINER_PASSWORD": trainer[1],
             "READER_USERNAME": reader[0], "READER_PASSWORD": reader[1]},
        capture_output=True, text=True, timeout=120)
    assert users.returncode == 0, users.stderr[-2000:]
    assert not any(p in users.stdout + users.stderr for p in (trainer[1], reader[1]))

    # The trainer registers a version (as training does) into the experiment it was granted.
    as_user(monkeypatch, trainer)
    client = mlflow.MlflowClient(server.url)
    run_id = client.create_run(client.get_experiment_by_name("train").experiment_id).info.run_id
    version = tracking.log_checkpoint_model(server.url, run_id, tiny_checkpoint(tmp_path), "deeplab", {}, {},
                                            pytorch_flavor=False)
    manifest = "s3://bucket/val.parquet"
    value_key, manifest_key = evaluation_tags("val_mIoU", manifest)
    for key, value in {value_key: "0.5", manifest_key: manifest, error_share_tag(manifest): "0.0"}.items():
        client.set_model_version_tag("deeplab", version, key, value)  # as an earlier evaluation left them

    # Anonymous: nothing, not even a read; the reader may read but not promote.
    as_user(monkeypatch, None)
    with pytest.raises(MlflowException, match="401|[Uu]nauthori|credentials"):
        mlflow.MlflowClient(server.url).set_registered_model_alias("deeplab", "champion", version)
    as_user(monkeypatch, reader)
    args = ["--model", "deeplab", "--candidate", version, "--tracking-uri", server.url, "--val-manifest", manifest]
    capsys.readouterr()  # the registration's download progress
    assert promote.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ermission" in err[0], err
    assert mlflow.MlflowClient(server.url).get_registered_model("deeplab").aliases == {}

    as_user(monkeypatch, trainer)
    assert promote.main(args) == 0
    assert mlflow.MlflowClient(server.url).get_registered_model("deeplab").aliases == {"champion": version}

    # The segmentation job reads the champion as the reader, end to end.
    as_user(monkeypatch, reader)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (24, 16), (120, 30, 200)).save(images / "a.png")
    capsys.readouterr()
    code = segment.main(["--model", "models:/deeplab@champion", "--input", str(images), "--output",
                         str(tmp_path / "out"), "--tracking-uri", server.url, "--scales", "1", "--no-flip",
                         "--no-crf"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert (tmp_path / "out" / "masks" / "a.png").is_file()
    assert not any(p[1] in out.out + out.err for p in (trainer, reader, (0, admin["MLFLOW_AUTH_ADMIN_PASSWORD"])))
