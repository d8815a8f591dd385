"""Deploy manifests run for real: the MLflow server starts with the manifest's own command and
settings (SQLite and moto S3 standing in for PostgreSQL and AWS).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.servers import free_port, http_ok, stop_process_group, wait_until

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------
# ray_cluster.yaml


# ---------------------------------------------------------------------------------------------
# KubeRay


# ---------------------------------------------------------------------------------------------
# MLflow server


@pytest.fixture(scope="module")
def mlflow_manifests() -> dict[str, dict]:
    folder = INFRA / "mlflow"
    docs = [d for p in sorted(folder.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_docs(p)]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.mark.slow
def test_mlflow_server_runs_with_the_manifest_settings(mlflow_manifests, s3_server, s3_options, s3_bucket, tmp_path,
                                                      monkeypatch):
    """Start `mlflow server` with the Deployment's own command and ConfigMap settings (SQLite and
    moto's S3 stand in for PostgreSQL and AWS): artifacts go to S3 through the server, in-cluster
    host names are served, other Host headers are refused, and nobody gets in without a user."""
    import base64
    import secrets

    import s3fs
    from mlflow import MlflowClient

    deployment = mlflow_manifests["Deployment/mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    config = mlflow_manifests["ConfigMap/mlflow-config"]["data"]
    env = env_of(container)
    port = free_port()
    ini = tmp_path / "basic_auth.ini"  # the ConfigMap key the Deployment mounts, its database moved here
    ini.write_text(config["basic_auth.ini"].replace("/var/lib/mlflow-auth/", f"{tmp_path}/"))
    admin = ("admin", secrets.token_urlsafe(16))
    values = {
        "ARTIFACTS_DESTINATION": f"{s3_bucket}/mlflow-artifacts",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_SERVER_ALLOWED_HOSTS": config[env["MLFLOW_SERVER_ALLOWED_HOSTS"]["valueFrom"]["configMapKeyRef"]["key"]],
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].endswith("/basic_auth.ini")
    command = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg) for arg in container["command"]]
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--workers") + 1] = "1"
    command[0] = str(Path(sys.executable).parent / "mlflow")
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(command, env={**os.environ, **values}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/health"), 120, "mlflow server", proc)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        client = MlflowClient(url)
        run = client.create_run("0")
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        keys = s3fs.S3FileSystem(**s3_options).find(f"{s3_bucket}/mlflow-artifacts")
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys

        def status_for(host: str, user: tuple[str, str] | None = admin) -> int:
            headers = {"Host": host}
            if user is not None:
                headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
            request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/get?experiment_id=0",
                                             headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status_for("mlflow.mlflow.svc:5000") == 200
        assert status_for("localhost:5000") == 200
        assert status_for("attacker.example.com") == 403
        assert status_for("mlflow.mlflow.svc:5000", user=None) == 401
        assert status_for("mlflow.mlflow.svc:5000", user=(admin[0], "wrong")) == 401
    finally:
        stop_process_group(proc)
        log.close()


# ---------------------------------------------------------------------------------------------
# Images


# ---------------------------------------------------------------------------------------------
# No secrets anywhere


