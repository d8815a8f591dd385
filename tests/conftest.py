"""Settings shared by every test. Tests are split by folder:

    tests/unit/         fast: torch, numpy, files and sqlite only; no Ray, no servers
                        (the server fixtures are not even visible there)
    tests/integration/  real services (Ray, moto S3, MLflow server) started once per session;
                        every test there is marked `slow` automatically
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# The same auth mode for `ray start`, the driver and `ray job submit` (Ray >= 2.59 turns token
# auth on by itself once ~/.ray/auth_token exists).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log


@pytest.fixture
def sqlite_tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture
def clean_aws_env(monkeypatch):
    """No AWS_* variable set: options come only from what the test passes."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
