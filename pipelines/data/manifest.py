"""Manifests: the table of ``{id, image_uri, mask_uri}`` rows that defines a dataset.

A run reads its manifest instead of listing a bucket (listing millions of keys on every run is
slow and costs money); the importers (pipelines/data/importers.py) list a layout once and write
the manifest. Tables are built column-wise with pyarrow (joins, string kernels), never row by row.

``mask_uri`` is null for inference-only rows. Manifests are parquet, CSV or JSONL, by extension.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.common.errors import InputError
from pipelines.common.redaction import redact_urls
from pipelines.data.storage import read_table, write_table

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("id", "image_uri", "mask_uri")
MANIFEST_SCHEMA = pa.schema([(name, pa.string()) for name in MANIFEST_COLUMNS])
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png",)
CITYSCAPES_TRAIN_IDS = "_gtFine_labelTrainIds.png"
CITYSCAPES_RAW_IDS = "_gtFine_labelIds.png"  # what the Cityscapes download holds


class ManifestError(InputError):
    """A manifest (or a layout being imported) is malformed; the message says where and how."""


# --------------------------------------------------------------------------- read / write


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Reads a parquet/CSV/JSONL manifest and validates it (see :func:`validate_table`).

    Returns a table with string columns ``id, image_uri, mask_uri`` (in that order; a missing
    ``mask_uri`` column reads as all-null, empty strings as null). Other columns are dropped.
    """
    try:
        table = read_table(uri, storage_options, string_columns=MANIFEST_COLUMNS)
    except FileNotFoundError:
        raise ManifestError(f"manifest {redact_urls(uri)} does not exist") from None
    except Exception as err:  # noqa: BLE001 - empty file, not parquet/CSV/JSON, bad URI, unknown protocol
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ManifestError(f"manifest {redact_urls(uri)} cannot be read: {reason}") from None
    return validate_table(table, source=str(uri))


def write_manifest(
    rows_or_table: pa.Table | Iterable[Mapping[str, Any]] | Mapping[str, list],
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Validates and writes a manifest (format by extension); returns ``uri``.

    Accepts a pyarrow table, a dict of columns, or an iterable of row dicts.
    """
    if isinstance(rows_or_table, pa.Table):
        table = rows_or_table
    elif isinstance(rows_or_table, Mapping):
        table = pa.table(dict(rows_or_table))
    else:
        table = pa.Table.from_pylist(list(rows_or_table))
    table = validate_table(table, source=str(uri))
    return write_table(table, uri, storage_options)


def validate_table(table: pa.Table, source: str = "manifest") -> pa.Table:
    """Checks columns, types, non-empty ids and image URIs, unique ids; normalises to the
    manifest schema (``mask_uri`` added as null if absent, empty ``mask_uri`` -> null)."""
    missing = [c for c in ("id", "image_uri") if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"{source}: missing column(s) {missing}; a manifest needs {list(MANIFEST_COLUMNS)} "
            f"(mask_uri optional), found {table.column_names}"
        )
    if "mask_uri" not in table.column_names:
        table = table.append_column("mask_uri", pa.nulls(table.num_rows, pa.string()))
    columns = {}
    for name in MANIFEST_COLUMNS:
        column = table.column(name)
        if column.type != pa.string():
            try:
                column = column.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ManifestError(f"{source}: column {name} has type {column.type}, "
                                    "expected strings") from None
        columns[name] = column
    for name in ("id", "image_uri"):
        empty = pc.or_kleene(pc.is_null(columns[name]), pc.equal(columns[name], "")).fill_null(True)
        count = pc.sum(empty).as_py() or 0
        if count:
            first = pc.index(empty, True).as_py()
            raise ManifestError(f"{source}: {count} row(s) with an empty {name} (first at row {first})")
    mask = columns["mask_uri"]
    columns["mask_uri"] = pc.if_else(pc.equal(mask, ""), pa.scalar(None, pa.string()), mask)
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    check_unique_ids(table, source)
    return table


def check_unique_ids(table: pa.Table, source: str) -> None:
    counts = pc.value_counts(table.column("id"))
    duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(duplicated):
        shown = duplicated.to_pylist()[:5]
        raise ManifestError(f"{source}: {len(duplicated)} duplicate id(s), e.g. {shown}")


def manifest_uris(manifests: Sequence[str], storage_options: Mapping[str, Any] | None,
                  columns: Sequence[str] = ("image_uri", "mask_uri")) -> Iterable[tuple[str, str]]:
    """(`<manifest> row <id>`, URI) for the file URIs inside `manifests`, read lazily."""
    for manifest in manifests:
        table = read_manifest(manifest, storage_options)
        ids = table.column("id").to_pylist()
        for column in columns:
            if column in table.column_names:
                for row_id, uri in zip(ids, table.column(column).to_pylist()):
                    yield f"{redact_urls(manifest)} row {row_id} {column}", uri
