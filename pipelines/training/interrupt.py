"""Ctrl-C during training: one line saying where it stopped and how to go on.

A training run checkpoints every `run.checkpoint_every` iterations and a re-run with the same
`run.name` and `run.storage_path` resumes from its latest checkpoint; so the iteration worth
naming is that checkpoint's (what a re-run continues from).
"""

from __future__ import annotations

import io
import posixpath
import signal
from collections.abc import Mapping
from typing import Any

from pipelines.data.checkpoints import TRAIN_STATE_FILE
from pipelines.data.storage import get_fs


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) ended training; the message is the line to print (exit 130)."""


def abort_on_sigint(trainer) -> None:
    """Ray Train's own SIGINT handler (installed by `fit()`) aborts the run and leaves the driver
    with exit 0 or 1 and no word of where it stopped. Ours aborts the controller the same way and
    raises KeyboardInterrupt in the driver, so the job can close its MLflow run as KILLED and say
    where a re-run resumes. (Ray 2.60 calls `_register_sigint_handler(controller)` from the main
    thread only; a trainer without it keeps Python's own Ctrl-C, also a KeyboardInterrupt.)"""

    def register(controller) -> None:
        def handler(signum, frame) -> None:  # noqa: ARG001
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: Python's own
            controller.abort.remote()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)

    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = register


def last_checkpoint_iteration(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> int | None:
    """The iteration of the newest readable `checkpoint_*` under `run_dir` (their names sort by
    time); None when there is none yet."""
    import torch

    fs, path = get_fs(run_dir, storage_options)
    try:
        names = sorted((p for p in fs.ls(path, detail=False) if posixpath.basename(p).startswith("checkpoint_")),
                       reverse=True)
    except FileNotFoundError:
        return None
    for name in names:
        try:
            state = torch.load(io.BytesIO(fs.cat_file(posixpath.join(name, TRAIN_STATE_FILE))), map_location="cpu",
                               weights_only=True)
            return int(state["iteration"])
        except Exception:  # noqa: BLE001 - a checkpoint cut short by the Ctrl-C itself: the one before
            continue
    return None


def stopped_line(iteration: int | None) -> str:
    if iteration is None:
        return "stopped before the first checkpoint; re-run to start again"
    return f"stopped at iteration {iteration} (its last checkpoint); re-run to resume"
