"""`make serve`: MLflow's scoring server on a registered version answers with masks (loopback,
a free port), from the venv without it being on PATH (the "uvicorn: not found" exit 127)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np

from deeplab_core.synthetic import SyntheticSpec
from pipelines import tracking
from pipelines.data.checkpoints import MODEL_FILE
from tests.helpers import untrained_checkpoint
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_make_serve_answers_with_a_mask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # sqlite MLflow keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = untrained_checkpoint(tmp_path / "ckpt", SyntheticSpec().num_classes)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("serve")).info.run_id
    version = tracking.log_checkpoint_model(uri, run_id, Path(ckpt) / MODEL_FILE, "served", {}, {},
                                            pytorch_flavor=False)
    client.set_registered_model_alias("served", "champion", version)
    # The logged model's page lists its version (the tag mlflow.register_model sets).
    logged = client.get_logged_model(tracking.logged_model_id(client.get_model_version("served", version)))
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "served", "version": int(version)}]

    port = free_port()
    # PATH without the venv, as in a fresh shell that did not activate it.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "serve", "MODEL=models:/served@champion",
                             f"TRACKING_URI={uri}", f"PORT={port}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    image = np.random.default_rng(0).integers(0, 256, (1, 40, 56, 3), dtype=np.uint8)
    try:
        deadline, answer = time.monotonic() + 240, None
        while answer is None:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no answer from the server in 240 s"
            try:
                answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": image.tolist()})
            except urllib.error.HTTPError as err:  # the server answered: with an error, not a mask
                raise AssertionError(json.loads(err.read()).get("stack_trace", "")[-2000:]) from None
            except OSError:  # not listening yet
                time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    mask = np.asarray(answer["predictions"])
    assert mask.shape == (1, 40, 56)
    with tracking.tracking_uri_set(uri):
        expected = mlflow.pyfunc.load_model("models:/served@champion").predict(image)
    np.testing.assert_array_equal(mask, expected)
