"""Ray Data pipelines over a manifest: validation, training (shuffled, augmented) and evaluation
(ordered, whole images).

All three start from the manifest table, which is small (three strings a row), so it is read on
the driver, shuffled there when needed, and handed to Ray Data in blocks of a few rows. Image
bytes are only ever read inside ``map_batches`` tasks, decoded once, transformed in the same task,
and streamed on; nothing materialises the images.

Storage options reach the tasks inside the batch callables' state (never as logged arguments):
the callables' ``repr`` and Ray's operator names show only the class name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.decode import DEFAULT_MAX_PIXELS
from pipelines.data.errors import ERRORS_FILE, ErrorRecord, RunSummary, write_errors
from pipelines.data.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from pipelines.data.rows import RowDecoder, object_array
from pipelines.common.uris import join_uri

logger = logging.getLogger(__name__)

CLEAN_MANIFEST_FILE = "manifest.parquet"
INDEX_COLUMN = "_row"  # position in the manifest: a row's identity for seeding and ordering
STATUS_OK, STATUS_ERROR = "ok", "error"
_MAX_BLOCKS = 4096  # bounds the driver's object-store puts for huge manifests


# --------------------------------------------------------------------------- batch functions


class ValidateBatch:
    """Manifest rows -> the same rows with ``status, stage, reason, error_uri``; no pixels kept."""

    def __init__(self, decoder: RowDecoder) -> None:
        self.decoder = decoder

    def __repr__(self) -> str:
        return type(self).__name__

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = self.decoder.decode_batch(batch)
        errors = [r.error for r in results]
        return batch.select([*MANIFEST_COLUMNS, INDEX_COLUMN]).append_column(
            "status", pa.array([STATUS_OK if e is None else STATUS_ERROR for e in errors])
        ).append_column(
            "stage", pa.array([None if e is None else e.stage for e in errors], pa.string())
        ).append_column(
            "reason", pa.array([None if e is None else e.reason for e in errors], pa.string())
        ).append_column(
            "error_uri", pa.array([None if e is None else e.uri for e in errors], pa.string())
        )


class TrainBatch:
    """Manifest rows -> ``image`` float32 N x 3 x h x w, ``mask`` int64 N x h x w (decode + augment
    in one task). Rows that fail are logged and skipped: run ``validate_manifest`` first to account
    for them in an errors manifest."""

    def __init__(self, decoder: RowDecoder, transform: Callable, seed: int | None) -> None:
        self.decoder = decoder
        self.transform = transform
        self.seed = seed

    def __repr__(self) -> str:
        return type(self).__name__

    def __call__(self, batch: pa.Table, seed_config=None, data_context=None) -> dict[str, np.ndarray]:
        epoch = 0
        if seed_config is not None and data_context is not None:
            seed_tuple = seed_config.get_seed_tuple(data_context=data_context)
            if seed_tuple is not None and seed_tuple.execution_idx is not None:
                epoch = seed_tuple.execution_idx
        rows = batch.column(INDEX_COLUMN).to_pylist()
        images, masks = [], []
        for row, decoded in zip(rows, self.decoder.decode_batch(batch)):
            if decoded.error is not None:
                _log_skipped(decoded.error)
                continue
            rng = np.random.default_rng(None if self.seed is None else (self.seed, epoch, row))
            image, mask = self.transform(decoded.image, decoded.mask, rng=rng)
            images.append(image.numpy())
            masks.append(mask.numpy())
        if not images:
            height, width = getattr(self.transform, "crop_hw", (0, 0))
            return {"image": np.zeros((0, 3, height, width), np.float32),
                    "mask": np.zeros((0, height, width), np.int64)}
        return {"image": np.stack(images), "mask": np.stack(masks)}


class EvalBatch:
    """Manifest rows -> ``id, image_uri, image`` (uint8 H x W x 3, original size), ``mask``
    (uint8 H x W; 0 x 0 when the row has none) and ``status, stage, reason``. Bad rows stay in
    the output as error rows with 0 x 0 arrays, so the consumer can account for every input."""

    def __init__(self, decoder: RowDecoder, with_masks: bool) -> None:
        self.decoder = decoder
        self.with_masks = with_masks

    def __repr__(self) -> str:
        return type(self).__name__

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        results = self.decoder.decode_batch(batch)
        empty_image, empty_mask = np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8)
        out = {
            "id": np.asarray(batch.column("id").to_pylist(), dtype=object),
            "image_uri": np.asarray(batch.column("image_uri").to_pylist(), dtype=object),
            "image": object_array([empty_image if r.image is None else r.image for r in results]),
            "status": np.asarray([STATUS_OK if r.error is None else STATUS_ERROR for r in results],
                                 dtype=object),
            "stage": np.asarray([None if r.error is None else r.error.stage for r in results],
                                dtype=object),
            "reason": np.asarray([None if r.error is None else r.error.reason for r in results],
                                 dtype=object),
        }
        if self.with_masks:
            out["mask"] = object_array([empty_mask if r.mask is None else r.mask for r in results])
        return out


def _log_skipped(error: ErrorRecord) -> None:
    logger.warning(
        "skipping %s (%s): %s: %s", error.id, error.uri, error.stage, error.reason
    )


# --------------------------------------------------------------------------- datasets


def validate_manifest(
    manifest_uri: str,
    out_dir: str,
    num_classes: int,
    storage_options: Mapping[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    require_masks: bool = True,
    batch_size: int = 16,
) -> tuple[str, RunSummary]:
    """One Ray Data pass that reads and decodes every row of a manifest.

    Writes ``{out_dir}/manifest.parquet`` (the good rows, in manifest order) and
    ``{out_dir}/errors.parquet`` (one :class:`ErrorRecord` per bad row, possibly none), prints the
    summary line and returns ``(clean_manifest_uri, summary)``; ``read == ok + errors`` holds.
    """
    table = _indexed(read_manifest(manifest_uri, storage_options))
    decoder = RowDecoder(storage_options, num_classes, max_pixels, require_masks)
    results = _manifest_dataset(table, batch_size).map_batches(
        ValidateBatch(decoder), batch_size=batch_size, batch_format="pyarrow"
    )
    parts = list(results.iter_batches(batch_size=None, batch_format="pyarrow"))
    checked = pa.concat_tables(parts).sort_by(INDEX_COLUMN) if parts else _empty_checked()
    ok_rows = pc.equal(checked.column("status"), STATUS_OK)
    clean = checked.filter(ok_rows).select(list(MANIFEST_COLUMNS))
    bad = checked.filter(pc.invert(ok_rows))
    errors = pa.table({"id": bad.column("id"), "uri": bad.column("error_uri"),
                       "stage": bad.column("stage"), "reason": bad.column("reason")})
    summary = RunSummary(read=checked.num_rows, ok=clean.num_rows, errors=errors.num_rows)
    if summary.read != table.num_rows:
        raise RuntimeError(f"validation returned {summary.read} rows for {table.num_rows} inputs")
    clean_uri = join_uri(out_dir, CLEAN_MANIFEST_FILE)
    write_errors(errors, join_uri(out_dir, ERRORS_FILE), storage_options)
    write_manifest(clean, clean_uri, storage_options)
    return clean_uri, summary


def train_dataset(
    manifest_uri: str,
    transform: Callable,
    num_classes: int,
    storage_options: Mapping[str, Any] | None = None,
    seed: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 16,
):
    """A shuffled, augmented training stream: columns ``image`` (float32 3 x h x w) and ``mask``
    (int64 h x w) from ``transform`` (a ``TrainTransform``: ``t(image, mask, rng=)``).

    Shuffling happens on the manifest, never on pixels: the manifest rows are permuted on the
    driver and the block order is re-randomised on every execution (epoch). With ``seed`` both are
    seeded and row ``i`` of execution ``e`` is augmented with ``default_rng((seed, e, i))``, so a
    seeded run is reproducible yet sees new augmentations each epoch. Hand it to a ``TorchTrainer``
    as ``datasets={"train": ds}``; workers get shards from ``get_dataset_shard("train")``.
    """
    import ray.data

    table = _indexed(read_manifest(manifest_uri, storage_options))
    permutation = np.random.default_rng(seed).permutation(table.num_rows)
    table = table.take(pa.array(permutation))
    seed_config = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    decoder = RowDecoder(storage_options, num_classes, max_pixels, require_masks=True)
    ds = _manifest_dataset(table, batch_size).randomize_block_order(seed=seed_config)
    return ds.map_batches(
        TrainBatch(decoder, transform, seed),
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_args=(seed_config, ds.context),
    )


def eval_dataset(
    manifest_uri: str,
    num_classes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    with_masks: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 4,
):
    """An ordered stream of whole images in manifest order: columns ``id, image_uri, image``
    (uint8 H x W x 3), ``mask`` (uint8 H x W, 0 x 0 for rows without one; only with
    ``with_masks``) and ``status`` (``"ok"``/``"error"``), ``stage``, ``reason``.

    Bad rows are error rows, not exceptions (their arrays are empty), so every input is accounted
    for. ``num_classes=None`` skips the mask value range check.
    """
    table = _indexed(read_manifest(manifest_uri, storage_options))
    decoder = RowDecoder(storage_options, num_classes, max_pixels, require_masks=False,
                         read_masks=with_masks)
    ds = _manifest_dataset(table, batch_size).map_batches(
        EvalBatch(decoder, with_masks), batch_size=batch_size, batch_format="pyarrow"
    )
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy
    return ds


# --------------------------------------------------------------------------- helpers


def _indexed(table: pa.Table) -> pa.Table:
    return table.append_column(INDEX_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _manifest_dataset(table: pa.Table, rows_per_block: int):
    """The manifest as a Ray dataset of small blocks, so decoding spreads over tasks."""
    import ray.data

    rows_per_block = max(rows_per_block, math.ceil(table.num_rows / _MAX_BLOCKS), 1)
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks or [table])


def _empty_checked() -> pa.Table:
    columns = [*MANIFEST_COLUMNS, "status", "stage", "reason", "error_uri"]
    table = pa.table({name: pa.array([], pa.string()) for name in columns})
    return table.append_column(INDEX_COLUMN, pa.array([], pa.int64()))
