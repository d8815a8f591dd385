"""Dataset importers: a layout on any storage listed once and written as a manifest
(pipelines/data/manifest.py): PASCAL VOC, Cityscapes (train-id masks written where missing), a
plain images/ + masks/ folder pair. Tables are built column-wise with pyarrow, never row by row.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from deeplab_core.datasets import cityscapes_train_ids
from pipelines.common.uris import absolute_uri, join_uri
from pipelines.data.manifest import (
    CITYSCAPES_RAW_IDS,
    CITYSCAPES_TRAIN_IDS,
    IMAGE_EXTENSIONS,
    MANIFEST_COLUMNS,
    MASK_EXTENSIONS,
    ManifestError,
    check_unique_ids,
    write_manifest,
)
from pipelines.data.storage import get_fs, uri_for, write_atomically

logger = logging.getLogger(__name__)


def import_voc(
    root: str,
    split: str,
    out_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    mask_dir: str = "SegmentationClass",
    image_dir: str = "JPEGImages",
    image_ext: str = ".jpg",
) -> str:
    """Manifest of a PASCAL VOC layout: ids from ``ImageSets/Segmentation/{split}.txt``, images
    ``{image_dir}/{id}.jpg``, masks ``{mask_dir}/{id}.png`` (``SegmentationClassAug`` for the
    augmented set). The split file is authoritative: files it names but that are missing are not
    dropped here; ``ingest.validate_manifest`` reports them as error records."""
    root = absolute_uri(root)
    split_uri = join_uri(root, "ImageSets", "Segmentation", f"{split}.txt")
    fs, split_path = get_fs(split_uri, storage_options)
    try:
        text = fs.cat_file(split_path).decode()
    except FileNotFoundError:
        raise ManifestError(f"VOC split file {split_uri} does not exist") from None
    ids = pa.array([line.split()[0] for line in text.splitlines() if line.strip()], pa.string())
    table = pa.table(
        {
            "id": ids,
            "image_uri": _wrap(ids, join_uri(root, image_dir, ""), image_ext),
            "mask_uri": _wrap(ids, join_uri(root, mask_dir, ""), ".png"),
        }
    )
    return write_manifest(table, out_uri, storage_options)


def import_cityscapes(
    root: str,
    split: str,
    out_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    label_suffix: str = CITYSCAPES_TRAIN_IDS,
    num_threads: int = 16,
) -> str:
    """Manifest of a Cityscapes layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` matched
    with ``gtFine/{split}/{city}/*{label_suffix}`` (train ids). Images without a label get a null
    ``mask_uri``.

    The download holds raw ``*_gtFine_labelIds.png``: each one without a ``*_labelTrainIds.png``
    beside it gets one, written once as cityscapesscripts' ``createTrainIdLabelImgs`` would
    (the 19 train ids, 255 for the rest), so a re-import converts nothing again."""
    root = absolute_uri(root)
    images = _list_by_id(join_uri(root, "leftImg8bit", split), "_leftImg8bit.png",
                         storage_options, "image_uri")
    if images.num_rows == 0:
        raise ManifestError(f"no *_leftImg8bit.png under {join_uri(root, 'leftImg8bit', split)}")
    labels_root = join_uri(root, "gtFine", split)
    labels = _list_by_id(labels_root, label_suffix, storage_options, "mask_uri")
    if label_suffix == CITYSCAPES_TRAIN_IDS:
        raw = _list_by_id(labels_root, CITYSCAPES_RAW_IDS, storage_options, "raw_uri")
        unconverted = raw.join(labels.select(["id"]), keys="id", join_type="left anti").sort_by("id")
        if unconverted.num_rows:
            written = _write_train_id_labels(unconverted, labels_root, storage_options, num_threads)
            labels = pa.concat_tables([labels, written]).sort_by("id")
    if labels.num_rows == 0 and split != "test":
        logger.warning("no *%s (nor *%s) under %s: all masks will be null", label_suffix,
                       CITYSCAPES_RAW_IDS, labels_root)
    table = _match(images, labels, f"{root} ({split})")
    return write_manifest(table, out_uri, storage_options)


def _write_train_id_labels(raw: pa.Table, labels_root: str, storage_options: Mapping[str, Any] | None,
                           num_threads: int) -> pa.Table:
    """``*_gtFine_labelTrainIds.png`` beside each ``*_gtFine_labelIds.png`` of ``raw``
    (columns ``id, raw_uri``); returns ``(id, mask_uri)`` of the written files."""
    sources = raw.column("raw_uri").to_pylist()
    targets = [uri[: -len(CITYSCAPES_RAW_IDS)] + CITYSCAPES_TRAIN_IDS for uri in sources]

    def convert(source: str, target: str) -> None:
        fs, path = get_fs(source, storage_options)
        label_ids = np.asarray(Image.open(io.BytesIO(fs.cat_file(path))))
        if label_ids.ndim != 2:
            raise ManifestError(f"{source}: expected a single-channel label-id image, got shape {label_ids.shape}")
        buffer = io.BytesIO()
        Image.fromarray(cityscapes_train_ids(label_ids)).save(buffer, format="PNG")
        write_atomically(target, buffer.getvalue(), storage_options)  # never a half-written mask to skip later

    total, step = len(sources), max(1, len(sources) // 10)
    print(f"cityscapes: {total} *{CITYSCAPES_RAW_IDS} without *{CITYSCAPES_TRAIN_IDS} under {labels_root}: "
          f"writing train-id masks beside them (once)", file=sys.stderr, flush=True)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for done, _ in enumerate(pool.map(convert, sources, targets), start=1):
            if done % step == 0 or done == total:
                rate = done / max(time.monotonic() - start, 1e-9)
                print(f"cityscapes: {done}/{total} train-id masks written ({rate:.0f}/s)", file=sys.stderr, flush=True)
    return pa.table({"id": raw.column("id"), "mask_uri": pa.array(targets, pa.string())})


def import_folders(
    images_uri: str,
    masks_uri: str | None,
    out_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    mask_extensions: tuple[str, ...] = MASK_EXTENSIONS,
    strict: bool = False,
) -> str:
    """Manifest of an ``images/`` + ``masks/`` folder pair matched by relative path without the
    extension (``images/a/1.jpg`` <-> ``masks/a/1.png``, id ``a/1``). Images without a mask get
    a null ``mask_uri``; masks without an image are reported (a warning, or a
    :class:`ManifestError` with ``strict``). ``masks_uri=None`` makes an inference manifest."""
    images = _list_by_id(images_uri, image_extensions, storage_options, "image_uri")
    if images.num_rows == 0:
        raise ManifestError(f"no images ({', '.join(image_extensions)}) under {images_uri}")
    if masks_uri is None:
        masks = pa.table({"id": pa.array([], pa.string()), "mask_uri": pa.array([], pa.string())})
    else:
        masks = _list_by_id(masks_uri, mask_extensions, storage_options, "mask_uri")
    table = _match(images, masks, str(images_uri), strict=strict)
    return write_manifest(table, out_uri, storage_options)


def _wrap(ids: pa.Array, prefix: str, suffix: str) -> pa.Array:
    return pc.binary_join_element_wise(prefix, ids, suffix, "")


def _list_by_id(
    root_uri: str,
    suffixes: str | tuple[str, ...],
    storage_options: Mapping[str, Any] | None,
    uri_column: str,
) -> pa.Table:
    """One recursive listing of ``root_uri``: a table ``(id, uri_column)`` of the files ending in
    ``suffixes`` (case-insensitive), id = path relative to the root minus the suffix."""
    fs, root_path = get_fs(root_uri, storage_options)
    suffixes = (suffixes,) if isinstance(suffixes, str) else suffixes
    try:
        paths = pa.array(sorted(fs.find(root_path)), pa.string())
    except FileNotFoundError:
        paths = pa.array([], pa.string())
    prefix = root_path.rstrip("/") + "/"
    uri_prefix = uri_for(fs, prefix, root_uri)
    paths = pc.filter(paths, pc.starts_with(paths, prefix))
    relative = pc.utf8_slice_codeunits(paths, start=len(prefix))
    lowered = pc.utf8_lower(relative)
    parts = []
    for suffix in dict.fromkeys(s.lower() for s in suffixes):
        selected = pc.filter(relative, pc.ends_with(lowered, suffix))
        parts.append(pa.table({
            "id": pc.utf8_slice_codeunits(selected, start=0, stop=-len(suffix)),
            uri_column: pc.binary_join_element_wise(uri_prefix, selected, ""),
        }))
    return pa.concat_tables(parts).sort_by("id")


def _match(images: pa.Table, masks: pa.Table, source: str, strict: bool = False) -> pa.Table:
    """Left join images to masks by id; reports masks without an image."""
    for name, table in (("image", images), ("mask", masks)):
        check_unique_ids(table, f"{source}: {name} listing")
    orphans = masks.join(images.select(["id"]), keys="id", join_type="left anti")
    if orphans.num_rows:
        shown = sorted(orphans.column("id").to_pylist())[:5]
        message = f"{source}: {orphans.num_rows} mask(s) without an image, e.g. {shown}"
        if strict:
            raise ManifestError(message)
        logger.warning(message)
    table = images.join(masks, keys="id", join_type="left outer")
    return table.select(list(MANIFEST_COLUMNS)).sort_by("id")
