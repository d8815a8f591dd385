"""Class lists, palettes and label tables of the datasets the public checkpoints were trained on
(PASCAL VOC 2012: 21 classes; Cityscapes: 19 train ids). NumPy only, no torch.

The VOC colour map itself is `deeplab_core.palette.voc_palette()` (index = class id, 255 = ignore).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .constants import IGNORE_INDEX

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class CityscapesLabel(NamedTuple):
    name: str
    id: int  # the value in *_gtFine_labelIds.png
    train_id: int  # 0..18, or 255 = not trained on (cityscapesscripts also uses -1 for that)
    color: tuple[int, int, int]


# The official table (cityscapesscripts.helpers.labels), name / id / trainId / colour.
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(CityscapesLabel(*row) for row in (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
    ("license plate", -1, -1, (0, 0, 142)),
))

_TRAINED = sorted((label for label in CITYSCAPES_LABELS if 0 <= label.train_id < IGNORE_INDEX), key=lambda l: l.train_id)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(label.name for label in _TRAINED)  # index = train id
CITYSCAPES_COLORS: tuple[tuple[int, int, int], ...] = tuple(label.color for label in _TRAINED)


def _label_to_train_id() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in CITYSCAPES_LABELS:
        if label.id >= 0 and 0 <= label.train_id < IGNORE_INDEX:
            table[label.id] = label.train_id
    table.flags.writeable = False
    return table


# Lookup table: raw label id (0..255) -> train id; 255 for every id not trained on.
CITYSCAPES_LABEL_TO_TRAIN_ID: np.ndarray = _label_to_train_id()


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """A `*_gtFine_labelIds.png` array (H x W integer ids) -> uint8 train ids, 255 for the rest
    (what cityscapesscripts' `createTrainIdLabelImgs` writes as `*_labelTrainIds.png`)."""
    label_ids = np.asarray(label_ids)
    if not np.issubdtype(label_ids.dtype, np.integer):
        raise ValueError(f"label ids must be an integer array, got {label_ids.dtype}")
    inside = (label_ids >= 0) & (label_ids < len(CITYSCAPES_LABEL_TO_TRAIN_ID))
    return np.where(inside, CITYSCAPES_LABEL_TO_TRAIN_ID[np.clip(label_ids, 0, 255)], IGNORE_INDEX).astype(np.uint8)


def cityscapes_palette() -> list[int]:
    """768 ints (R, G, B for train ids 0..255: the 19 classes' official colours, black for the
    rest, 255 included), the form `PIL.Image.putpalette` takes."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(CITYSCAPES_COLORS)] = CITYSCAPES_COLORS
    return palette.reshape(-1).tolist()
