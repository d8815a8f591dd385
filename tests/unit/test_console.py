"""The jobs' console: progress lines and what keeps Ray's and MLflow's chatter off it."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from pipelines.common import console
from pipelines.training.loop import format_duration, progress_text


def test_train_progress_text_has_percent_and_eta():
    assert progress_text(230, 1200, 0, 60.0) == "it 230/1200 (19%) eta 4m13s"
    assert progress_text(1200, 1200, 0, 300.0) == "it 1200/1200 (100%)"  # done: no eta
    # A resumed run's pace is its own: 100 iterations in 50 s, 500 to go.
    assert progress_text(600, 1100, 500, 50.0) == "it 600/1100 (54%) eta 4m10s"
    assert progress_text(500, 1100, 500, 0.0) == "it 500/1100 (45%)"  # nothing done yet here


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (190, "3m10s"), (7500, "2h05m")])
def test_durations_are_short(seconds, text):
    assert format_duration(seconds) == text


def test_local_cluster_env_quiets_ray_data_console_only(monkeypatch):
    monkeypatch.delenv("DEEPLAB_VERBOSE", raising=False)
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    env = console.local_cluster_env()
    config = json.loads(open(env["RAY_DATA_LOGGING_CONFIG"]).read())
    assert config["handlers"]["console"]["level"] == "WARNING"
    assert config["handlers"]["file"]["filename"] == "ray-data.log"  # the session's log keeps all
    assert config["loggers"]["ray.data._internal.progress"] == {"level": "ERROR"}


def test_verbose_and_a_users_config_keep_ray_datas_logging(monkeypatch):
    monkeypatch.delenv("DEEPLAB_VERBOSE", raising=False)
    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", "/mine.yaml")
    assert console.local_cluster_env() == {}
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG")
    monkeypatch.setenv("DEEPLAB_VERBOSE", "1")
    assert console.local_cluster_env() == {}


def test_local_manifest_is_a_dataset_source_without_a_warning(tmp_path):
    from pipelines.tracking.runs import _dataset_source

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = _dataset_source(str(tmp_path / "train.parquet"))
    assert source._get_source_type() == "local" and source.uri == str(tmp_path / "train.parquet")


def test_local_cluster_env_writes_a_private_file_per_run(monkeypatch, tmp_path):
    """Not a fixed, predictable name in the shared temp folder that a planted file could take."""
    import stat

    monkeypatch.delenv("DEEPLAB_VERBOSE", raising=False)
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    first, second = (console.local_cluster_env()["RAY_DATA_LOGGING_CONFIG"] for _ in range(2))
    assert first != second
    for path in (first, second):
        folder = os.path.dirname(path)
        assert os.path.dirname(folder) == str(tmp_path)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert json.loads(open(path).read())["handlers"]["console"]["level"] == "WARNING"
