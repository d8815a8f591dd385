"""Create (or update) the MLflow users of deeplab-ray on a server that runs `--app-name basic-auth`.

    MLFLOW_TRACKING_URI=http://mlflow.mlflow.svc:5000 \
    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \
    TRAINER_USERNAME=deeplab-trainer TRAINER_PASSWORD=... \
    READER_USERNAME=deeplab-reader READER_PASSWORD=... \
    python infra/mlflow/users.py [--model deeplab] [--experiment voc]

Run as the admin (the Kubernetes Job `mlflow-users` in infra/mlflow/users-job.yaml does it with
the Secrets). The server's default permission is NO_PERMISSIONS, so each user gets exactly:

- trainer: EDIT on the registered model (register versions, set tags, move the alias: promotion)
  and on the training experiment;
- reader (the segmentation job): READ on the registered model and the training experiment (the
  versions' artifacts live there). Its own segmentation runs go to an experiment it creates.

Idempotent: an existing user gets its password reset to the given one (rotation). Passwords are
read from the environment only and never printed.
"""

from __future__ import annotations

import argparse
import os
import sys

ROLES = {"TRAINER": "EDIT", "READER": "READ"}


def _ensure_user(client, username: str, password: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_user(username, password)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(username, password)


def _experiment_id(tracking_uri: str, name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplab", help="registered model name (default: deeplab)")
    parser.add_argument("--experiment", default="voc", help="training experiment (default: voc)")
    args = parser.parse_args(argv)
    missing = [f"{role}_{part}" for role in ROLES for part in ("USERNAME", "PASSWORD")
               if not os.environ.get(f"{role}_{part}")]
    missing += [v for v in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
                if not os.environ.get(v)]
    if missing:
        print(f"users.py: error: set {', '.join(missing)}", file=sys.stderr)
        return 2
    import mlflow.server

    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    client = mlflow.server.get_app_client("basic-auth", tracking_uri=tracking_uri)
    experiment_id = _experiment_id(tracking_uri, args.experiment)
    for role, permission in ROLES.items():
        username = os.environ[f"{role}_USERNAME"]
        _ensure_user(client, username, os.environ[f"{role}_PASSWORD"])
        client.grant_user_permission(username, "registered_model", args.model, permission)
        client.grant_user_permission(username, "experiment", experiment_id, permission)
        print(f"users.py: {username}: {permission} on registered model {args.model!r} and experiment "
              f"{args.experiment!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
