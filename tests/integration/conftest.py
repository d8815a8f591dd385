"""Session-wide real services: one Ray cluster, one moto S3 endpoint, one MLflow server.

All bind to 127.0.0.1 on free ports. Credentials are moto's dummy ones; they never leave loopback.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.servers import MlflowServer, MotoS3, RayHead

INTEGRATION = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server():
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_options(s3_server) -> dict:
    """fsspec/s3fs storage options for the loopback endpoint."""
    return {"endpoint_url": s3_server.endpoint_url, "key": "testing", "secret": "testing"}


@pytest.fixture
def s3_bucket(s3_server, s3_options) -> str:
    """A fresh, empty bucket; returns its `s3://name` URI."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One real local Ray cluster per session (head with dashboard, so `ray job submit` works).

    The head inherits the moto endpoint through AWS_ENDPOINT_URL, as a cluster would inherit its
    real S3 endpoint from its environment.
    """
    import ray

    log = tmp_path_factory.mktemp("ray") / "head.log"
    head = RayHead(env={"AWS_ENDPOINT_URL": s3_server.endpoint_url}).start(log)
    ray.init(address=head.address, logging_level="WARNING", log_to_driver=True)
    yield head
    ray.shutdown()
    head.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(root=tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()
