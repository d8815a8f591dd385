"""Check an offline wheelhouse install: imports and a tiny dense-CRF inference, no torch needed.

    python3.12 infra/check_wheelhouse.py          # gpu tier: cv2, yaml, pydantic, pytest, pydensecrf
    python3.12 infra/check_wheelhouse.py --full   # also ray (one small Ray Data job), mlflow, ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydantic  # noqa: E402
import pydensecrf.densecrf as dcrf  # noqa: E402
import pytest  # noqa: E402
import pytest_timeout  # noqa: E402, F401
import yaml  # noqa: E402

from deeplab_core.constants import CRFParams
from deeplab_core.crf import dense_crf  # noqa: E402


def check_gpu_tier() -> None:
    print(f"python {sys.version.split()[0]} | opencv {cv2.__version__} | numpy {np.__version__} | "
          f"pyyaml {yaml.__version__} | pydantic {pydantic.__version__} | pytest {pytest.__version__}")
    h, w, c = 60, 80, 3
    image = np.zeros((h, w, 3), np.uint8)
    image[:, w // 2:] = 200
    image = cv2.GaussianBlur(image, (5, 5), 0)
    probs = np.random.default_rng(0).dirichlet(np.ones(c), size=(h, w)).transpose(2, 0, 1)
    probs[1, :, w // 2:] += 0.5  # class 1 is likelier on the bright half
    probs = (probs / probs.sum(0, keepdims=True)).astype(np.float32)
    start = time.perf_counter()
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(c, -1)))
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    raw = np.array(crf.inference(5)).reshape(c, h, w)
    refined = dense_crf(image, probs, params=CRFParams(iterations=5))
    assert refined.shape == (c, h, w) and np.allclose(refined.sum(0), 1, atol=1e-3)
    share = float(np.mean(refined.argmax(0)[:, w // 2:] == 1))
    assert share > 0.9 and np.isfinite(raw).all(), share
    print(f"pydensecrf inference ok ({time.perf_counter() - start:.3f} s; bright half -> class 1: {share:.2f})")
    ok, png = cv2.imencode(".png", image)
    assert ok and cv2.imdecode(png, cv2.IMREAD_COLOR_RGB).shape == image.shape
    print("opencv encode/decode ok")


def check_full_tier() -> None:
    import os
    import tempfile

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import matplotlib
    import mlflow
    import moto
    import pyarrow
    import ray
    import ray.data
    import ray.train  # noqa: F401
    import s3fs

    print(f"ray {ray.__version__} | mlflow {mlflow.__version__} | pyarrow {pyarrow.__version__} | "
          f"s3fs {s3fs.__version__} | moto {moto.__version__} | matplotlib {matplotlib.__version__}")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        total = sum(row["id"] for row in ray.data.range(10).map(lambda r: {"id": r["id"] * 2}).take_all())
        assert total == 90, total
    finally:
        ray.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        with mlflow.start_run():
            mlflow.log_metric("x", 1.0)
    print("ray data job and mlflow sqlite run ok")


if __name__ == "__main__":
    check_gpu_tier()
    if "--full" in sys.argv[1:]:
        check_full_tier()
    print("wheelhouse check passed")
