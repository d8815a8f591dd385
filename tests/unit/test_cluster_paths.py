"""What a multi-node cluster refuses, and how a failure inside Ray becomes one line (no Ray here:
the cluster side is tests/integration/test_multinode.py)."""

from __future__ import annotations

import traceback

import pytest

from pipelines.common.cluster_paths import is_node_local, is_node_local_tracking, refusal
from pipelines.common.errors import describe_failure, remember_failure


@pytest.mark.parametrize("uri, local", [
    ("ray_results", True), ("/mnt/nfs/runs", True), ("file:///tmp/x", True), ("memory://x", True),
    ("s3://b/runs", False), ("gs://b/x", False),
])
def test_node_local_paths(uri, local):
    assert is_node_local(uri) is local


@pytest.mark.parametrize("uri, local", [
    ("sqlite:///mlflow.db", True), ("sqlite:////abs/mlflow.db", True), ("file:///tmp/mlruns", True),
    ("mlruns", True), ("http://mlflow:5000", False), ("https://u:p@mlflow", False),
    ("postgresql://db/mlflow", False), ("databricks", False),
])
def test_node_local_tracking(uri, local):
    assert is_node_local_tracking(uri) is local


def test_refusal_names_every_local_path_and_what_to_use_in_one_line():
    line = refusal({"run.storage_path": "ray_results", "data.root": "s3://b/data"},
                   {"tracking.tracking_uri": "sqlite:///mlflow.db"}, "this Ray cluster has 3 nodes")
    assert "\n" not in line
    assert line.startswith("this Ray cluster has 3 nodes, and these paths are on one node's disk: ")
    assert "run.storage_path=ray_results: use s3://bucket/..." in line
    assert "data.root" not in line
    assert "tracking.tracking_uri=sqlite:///mlflow.db: use an MLflow server" in line
    assert line.endswith("or pass --shared-fs if they are on a filesystem every node mounts at the same place (NFS)")


def test_nothing_to_refuse_when_everything_is_shared():
    assert refusal({"--input": "s3://b/in", "--output": "s3://b/out"}, {"t": "http://mlflow:5000"}, "x") is None


def test_refusal_redacts_passwords():
    line = refusal({"p": "file://user:secret@host/x"}, {}, "x")
    assert "secret" not in line and "file://user:***@host/x" in line


def _raise_chain():
    try:
        raise KeyError("inner detail")
    except KeyError as err:
        raise OSError("outer wrapper") from err


def test_remembered_failure_names_the_innermost_exception():
    with pytest.raises(OSError) as caught:
        try:
            _raise_chain()
        except OSError as err:
            remember_failure(err)
            raise
    err = caught.value
    err.__cause__ = None  # what reaches the driver from a Ray worker: the chain is gone
    assert describe_failure(err) == "KeyError: 'inner detail'"


def test_plain_exception_is_type_and_collapsed_message():
    assert describe_failure(ValueError("a\n  b")) == "ValueError: a b"
    assert describe_failure(RuntimeError()) == "RuntimeError"


def test_ray_task_error_text_gives_stage_node_and_innermost_exception():
    """The text of a real RayTaskError from a Ray Data UDF (captured from Ray 2.60, ANSI codes and
    all), parsed through a stand-in carrying the same class name and text."""
    try:
        _raise_chain()
    except OSError:
        trace = traceback.format_exc().split("\n", 1)[1]  # Ray drops the "Traceback" line
    text = f"\x1b[36mray::ReadRange->MapBatches(write_stage)()\x1b[39m (pid=7463, ip=10.0.0.7)\n{trace}"

    class RayTaskError(Exception):
        def __str__(self):
            return text

    assert describe_failure(RayTaskError()) == "write_stage on node 10.0.0.7: KeyError: 'inner detail'"
