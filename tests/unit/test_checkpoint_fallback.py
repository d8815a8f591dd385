"""A truncated latest checkpoint: training resumes from the newest intact one and names the bad one."""

from __future__ import annotations

import logging

import pytest
import ray.train
import torch

from deeplab_core import PolyLRScheduler, build_model
from pipelines.training.config import load_train_config
from pipelines.training.loop import build_optimizer, restore_newest_intact, save_training_checkpoint


def fresh(cfg):
    model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=6, width_mult=0.25)
    optimizer = build_optimizer(model, cfg)
    return model, optimizer, PolyLRScheduler(optimizer, 100)


def test_truncated_latest_checkpoint_falls_back_to_the_newest_intact(tmp_path, caplog):
    cfg = load_train_config(None, [])
    model, optimizer, scheduler = fresh(cfg)
    for stamp, iteration in (("2026-01-01_00-00-01.000000", 10), ("2026-01-01_00-00-02.000000", 20),
                             ("2026-01-01_00-00-03.000000", 30)):
        directory = tmp_path / f"checkpoint_{stamp}"
        directory.mkdir()
        save_training_checkpoint(directory, model, optimizer, scheduler, iteration, meta={})
    latest = tmp_path / "checkpoint_2026-01-01_00-00-03.000000"
    data = (latest / "model.pt").read_bytes()
    (latest / "model.pt").write_bytes(data[: len(data) // 2])  # a write cut short

    restored, optimizer2, scheduler2 = fresh(cfg)
    with caplog.at_level(logging.WARNING, logger="pipelines.training.loop"):
        iteration = restore_newest_intact(ray.train.Checkpoint.from_directory(str(latest)), restored,
                                          optimizer2, scheduler2, max_it=100)
    assert iteration == 20
    assert str(latest) in caplog.text and "cannot be loaded" in caplog.text
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    cfg = load_train_config(None, [])
    model, optimizer, scheduler = fresh(cfg)
    only = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    only.mkdir()
    (only / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="no checkpoint of this run can be loaded"):
        restore_newest_intact(ray.train.Checkpoint.from_directory(str(only)), model, optimizer, scheduler, 100)
