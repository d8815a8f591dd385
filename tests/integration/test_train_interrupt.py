"""Ctrl-C during training: one line naming the iteration a re-run resumes from, exit 130, and
the MLflow run KILLED (not FAILED), as a terminal's Ctrl-C does it (SIGINT to the process group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow

from tests.integration.test_train import TINY

REPO = Path(__file__).resolve().parents[2]


def test_ctrl_c_stops_training_with_one_line_exit_130_and_a_killed_run(ray_cluster, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = TINY + [
        f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}", "run.name=stopped",
        f"tracking.tracking_uri={tracking}", "data.synthetic.num_train=16", "data.synthetic.num_val=4",
        "optim.max_iters=5000", "run.val_every=5", "run.checkpoint_every=5", "run.log_every=5",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "pipelines/train.py", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            out.append(line)
            if "[train] it 10/" in line:  # past a checkpoint (iteration 5)
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(400), "".join(out)[-3000:]
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    err = "".join(out)  # stdout and stderr: the progress lines are logged to stderr
    assert code == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and lines[0].startswith("train.py: stopped at iteration "), err[-3000:]
    assert lines[0].endswith("(its last checkpoint); re-run to resume")
    assert int(lines[0].split()[4]) >= 5
    # No traceback of the driver's (Ray's own actors may print theirs as they are torn down).
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-3000:]
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("deeplab").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
