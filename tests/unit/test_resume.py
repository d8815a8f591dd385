"""Explicit resume: the same run name continues only a run of the same model and data config."""

from __future__ import annotations

import json

import pytest

from pipelines.common.errors import InputError
from pipelines.training.config import load_train_config
from pipelines.training.resume import FINGERPRINT_FILE, check_resume, fingerprint


def test_same_config_resumes_and_another_is_refused_with_both_ways_out(tmp_path):
    run_dir = str(tmp_path / "runs" / "deeplab-demo")
    first = load_train_config(None, [])
    assert check_resume(first, run_dir) is False  # new run: fingerprint recorded
    assert json.loads((tmp_path / "runs" / "deeplab-demo" / FINGERPRINT_FILE).read_text()) == fingerprint(first)
    # More iterations or another LR is the same model and data: a killed or extended run continues.
    assert check_resume(load_train_config(None, ["optim.max_iters=900", "optim.base_lr=0.02"]), run_dir) is True

    other = load_train_config(None, ["model.backbone=resnet18", "model.options={}", "data.crop_size=96"])
    with pytest.raises(InputError) as info:
        check_resume(other, run_dir)
    message = str(info.value)
    assert "model.backbone: 'mobilenetv2' -> 'resnet18'" in message and "data.crop_size: 64 -> 96" in message
    assert "run.name=" in message and "run.resume=force" in message and "\n" not in message

    forced = load_train_config(None, ["model.backbone=resnet18", "model.options={}", "data.crop_size=96", "run.resume=force"])
    assert check_resume(forced, run_dir) is True
    assert check_resume(other, run_dir) is True  # the forced config is now the run's


def test_storage_credentials_are_not_part_of_the_fingerprint():
    plain = load_train_config(None, ["data.crop_size=96"])
    with_secret = load_train_config(None, ["data.crop_size=96", "data.storage_options={key: a, secret: b}"])
    assert fingerprint(plain) == fingerprint(with_secret)
    assert not any("storage_options" in key for key in fingerprint(with_secret))


def test_train_script_stops_before_ray_with_one_line(tmp_path, capsys):
    import ray

    from pipelines import train

    connected_before = ray.is_initialized()  # an earlier test of the session may hold a cluster
    storage = tmp_path / "runs"
    check_resume(load_train_config(None, []), str(storage / "deeplab-demo"))
    code = train.main([f"run.storage_path={storage}", "model.backbone=resnet18", "model.options={}", "tracking.tracking_uri=null",
                       f"data.root={tmp_path / 'data'}"])
    assert code == 2 and (connected_before or not ray.is_initialized())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: run 'deeplab-demo'"), err
