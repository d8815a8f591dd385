"""Writes the synthetic segmentation dataset (``deeplab_core.synthetic``) as a VOC layout at any URI.

::

    {root}/JPEGImages/synth_000000.jpg            RGB JPEG
    {root}/SegmentationClass/synth_000000.png     palette PNG, VOC colours, 255 = ignore band
    {root}/ImageSets/Segmentation/{train,val}.txt
    {root}/manifests/{train,val}.parquet          via importers.import_voc
    {root}/synthetic.json                         the parameters; written last

Generation is idempotent: when ``synthetic.json`` holds the same parameters and the split files and
manifests exist, nothing is rewritten. Files are rendered, encoded and uploaded in a thread pool
(object-store writes are latency-bound).
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

from deeplab_core.palette import colorize
from deeplab_core.synthetic import SyntheticSpec, render_scene
from pipelines.data.importers import import_voc
from pipelines.common.uris import absolute_uri, join_uri
from pipelines.data.storage import get_fs, make_parent_dirs

PARAMS_FILE = "synthetic.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def write_synthetic_voc(
    root_uri: str,
    num_train: int,
    num_val: int,
    spec: SyntheticSpec | None = None,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    jpeg_quality: int = 85,
    num_threads: int = 16,
    progress: bool | None = None,
) -> dict[str, str]:
    """Writes (or finds already written) ``num_train + num_val`` scenes as a VOC layout under
    ``root_uri`` and returns ``{"train_manifest": uri, "val_manifest": uri, "root": root_uri}``.

    Scene ``i`` (ids ``synth_%06d``; train first, then val) is ``render_scene(spec, s_i)`` with
    ``s_i`` drawn from ``SeedSequence([seed, i])``, so a dataset is a pure function of its
    parameters. ``progress`` (default: on from 500 scenes) prints a line per 10 % to stderr.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    spec = spec or SyntheticSpec()
    root_uri = absolute_uri(root_uri).rstrip("/")
    params = {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "jpeg_quality": jpeg_quality,
        "spec": dataclasses.asdict(spec),
    }
    result = {
        "train_manifest": join_uri(root_uri, "manifests", "train.parquet"),
        "val_manifest": join_uri(root_uri, "manifests", "val.parquet"),
        "root": root_uri,
    }
    if _already_written(root_uri, params, result, storage_options):
        return result

    ids = [f"synth_{i:06d}" for i in range(num_train + num_val)]
    _write_scenes(root_uri, ids, spec, seed, jpeg_quality, storage_options, num_threads,
                  progress if progress is not None else len(ids) >= 500)
    splits = {"train": ids[:num_train], "val": ids[num_train:]}
    for split, split_ids in splits.items():
        _write_text(join_uri(root_uri, "ImageSets", "Segmentation", f"{split}.txt"),
                    "".join(f"{i}\n" for i in split_ids), storage_options)
        import_voc(root_uri, split, result[f"{split}_manifest"], storage_options)
    _write_text(join_uri(root_uri, PARAMS_FILE), json.dumps(params, indent=2), storage_options)
    return result


def scene_seed(seed: int, index: int) -> int:
    """The ``render_scene`` seed of scene ``index`` in a dataset made with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def encode_scene(image: np.ndarray, mask: np.ndarray, jpeg_quality: int) -> tuple[bytes, bytes]:
    """(JPEG bytes of the RGB image, palette-PNG bytes of the mask)."""
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    png = io.BytesIO()
    colorize(mask).save(png, format="PNG")
    return jpeg.tobytes(), png.getvalue()


def _already_written(root_uri: str, params: dict, result: dict, storage_options) -> bool:
    fs, path = get_fs(join_uri(root_uri, PARAMS_FILE), storage_options)
    try:
        existing = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return False
    if existing != params:
        return False
    needed = [result["train_manifest"], result["val_manifest"]] + [
        join_uri(root_uri, "ImageSets", "Segmentation", f"{s}.txt") for s in SPLITS
    ]
    return all(fs.exists(get_fs(uri, storage_options)[1]) for uri in needed)


def _write_scenes(root_uri, ids, spec, seed, jpeg_quality, storage_options, num_threads,
                  progress: bool) -> None:
    fs, root_path = get_fs(root_uri, storage_options)
    image_dir = posixpath.join(root_path, "JPEGImages")
    mask_dir = posixpath.join(root_path, "SegmentationClass")
    for directory in (image_dir, mask_dir):
        make_parent_dirs(fs, posixpath.join(directory, ids[0] if ids else "_"), root_uri)

    def write_one(index: int) -> None:
        image, mask = render_scene(spec, scene_seed(seed, index))
        jpeg, png = encode_scene(image, mask, jpeg_quality)
        fs.pipe_file(f"{image_dir}/{ids[index]}.jpg", jpeg)
        fs.pipe_file(f"{mask_dir}/{ids[index]}.png", png)

    total, step = len(ids), max(1, len(ids) // 10)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for done, _ in enumerate(pool.map(write_one, range(total)), start=1):
            if progress and (done % step == 0 or done == total):
                rate = done / max(time.monotonic() - start, 1e-9)
                print(f"synthetic data: {done}/{total} scenes written ({rate:.0f}/s)",
                      file=sys.stderr, flush=True)


def _write_text(uri: str, text: str, storage_options) -> None:
    fs, path = get_fs(uri, storage_options)
    make_parent_dirs(fs, path, uri)
    fs.pipe_file(path, text.encode())
