"""segment.py --eval's console table: mIoU, mAcc, aAcc per variant, then IoU per named class."""

from __future__ import annotations

import numpy as np

from pipelines.segmentation.config import SegmentConfig
from pipelines.segmentation.report import Tally, evaluation_table
from pipelines.segmentation.stages import CM_CRF, CM_PLAIN, CM_TTA


def test_the_table_has_mean_and_pixel_accuracy_and_named_per_class_iou():
    # 3 classes; class 2 is in neither ground truth nor prediction (IoU undefined: "-").
    perfect = np.array([[6, 0, 0], [0, 2, 0], [0, 0, 0]])
    half = np.array([[6, 0, 0], [1, 1, 0], [0, 0, 0]])  # class 1: IoU 1/2, accuracy 1/2
    tally = Tally(ok=2, scored=2, cms={CM_PLAIN: half, CM_TTA: perfect, CM_CRF: perfect})
    cfg = SegmentConfig(model="m", input="i", output="o", scales=(0.75, 1.0))
    metrics, table = evaluation_table(tally, cfg.tta, 2, 5, ["background", "disc", "square"])
    lines = table.splitlines()
    assert lines[0] == "| variant | scales | flip | CRF | mIoU | mAcc | aAcc | images |"
    # plain: IoU (6/7 + 1/2) / 2 = 67.86; mAcc (1 + 1/2) / 2 = 75; aAcc 7/8 = 87.5
    assert lines[2] == "| plain | 1 | no | no | 67.86 | 75.00 | 87.50 | 2 |"
    assert lines[4] == "| + dense CRF | 0.75,1 | yes | yes (5 it) | 100.00 | 100.00 | 100.00 | 2 |"
    assert lines[6] == "| class | IoU plain | IoU + multi-scale + flip | IoU + dense CRF |"
    assert lines[8:] == ["| background | 85.71 | 100.00 | 100.00 |", "| disc | 50.00 | 100.00 | 100.00 |",
                         "| square | - | - | - |"]
    assert metrics["plain"]["mean_acc"] == 0.75
    _, unnamed = evaluation_table(tally, cfg.tta, 2, 5)
    assert "| class 1 | 50.00 |" in unnamed
