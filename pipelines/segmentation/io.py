"""Inputs, outputs and the idempotency contract of batch segmentation.

Outputs under ``--output``::

    masks/<id>.png               palette PNG (VOC colours; pixel values are the class ids)
    overlays/<id>.jpg            with --overlays
    results/<run>-<n>.parquet    one row per image {id, uri, output_uri, status, classes, seconds_*}
    errors/<run>-<n>.parquet     ErrorRecord rows {id, uri, stage, reason}
    _state.json                  watermark for --since last, and the last run's summary

Idempotency: a mask is written atomically (an object-store PUT, or temp file + rename locally)
and its results row only after it, so an image counts as done only when its ``ok`` row and its
mask both exist; a re-run skips exactly those, a killed run redoes at most its in-flight batches.
Reading the results keeps the latest row per id (:func:`read_results`).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.errors import ErrorRecord, errors_table
from pipelines.data.manifest import IMAGE_EXTENSIONS, read_manifest
from pipelines.data.storage import (
    TEMP_PREFIX,
    check_access,
    get_fs,
    is_local,
    join_uri,
    table_format,
    uri_for,
    write_atomically,
)

log = logging.getLogger(__name__)


STATE_FILE = "_state.json"


RESULTS_DIR, ERRORS_DIR, MASKS_DIR, OVERLAYS_DIR = "results", "errors", "masks", "overlays"


MASK_SUFFIX, OVERLAY_SUFFIX = ".png", ".jpg"


STATUS_OK, STATUS_ERROR = "ok", "error"


RESULTS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("output_uri", pa.string()),
    ("overlay_uri", pa.string()),
    ("status", pa.string()),
    ("classes", pa.list_(pa.int32())),
    ("seconds_decode", pa.float64()),
    ("seconds_model", pa.float64()),
    ("seconds_crf", pa.float64()),
    ("crf_backend", pa.string()),  # null without CRF; absent in parts written before it existed
    ("run_id", pa.string()),
    ("model_uri", pa.string()),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    # Added with CRF tuning: which CRF set refined the mask (null in older parts, or no CRF).
    ("crf_source", pa.string()),
    ("crf_params", pa.string()),
])


# --------------------------------------------------------------------------- ids and output keys


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
# `?versionId=` / `#` end an S3 or HTTP key early (another id's mask would be overwritten);
# `*[]{}` are fsspec glob characters; `%` may be decoded as an escape by a store.
_STORE_SPECIAL = frozenset("?#*[]{}%")


def check_id(record_id: str) -> str:
    """Returns ``record_id`` if it is safe as a relative output key, else raises ValueError.

    Output keys are ``masks/<id>.png``: an id must not climb out of (``..``), replace (absolute
    path, ``scheme:``/drive prefix) or confuse (backslash, NUL and other control characters,
    empty or ``.`` components) the output prefix. Ids are rejected rather than rewritten so two
    different ids can never collide on one mask.
    """
    if not isinstance(record_id, str) or not record_id:
        raise ValueError("empty id")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in record_id):
        raise ValueError("id contains a control character (NUL, newline, ...)")
    if "\\" in record_id:
        raise ValueError("id contains a backslash")
    if special := sorted(set(record_id) & _STORE_SPECIAL):  # a query, fragment or glob to a store
        raise ValueError(f"id contains {''.join(special)!r} (special to URLs or object-store globs)")
    if _SCHEME.match(record_id):
        raise ValueError("id starts with a URL scheme or drive prefix")
    if record_id.startswith(("/", "~")):
        raise ValueError("id is an absolute path")
    if any(part in ("", ".", "..") for part in record_id.split("/")):
        raise ValueError("id has an empty, '.' or '..' path component")
    return record_id


@dataclass(frozen=True)
class OutputLayout:
    """Where a run's outputs go; every key is derived from a checked id."""

    root: str  # URI

    def uri(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def mask_uri(self, record_id: str) -> str:
        return self.uri(MASKS_DIR, check_id(record_id) + MASK_SUFFIX)

    def overlay_uri(self, record_id: str) -> str:
        return self.uri(OVERLAYS_DIR, check_id(record_id) + OVERLAY_SUFFIX)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _list_files(uri: str, storage_options, suffix: str) -> list[str]:
    """Paths (inside the filesystem) under ``uri`` ending in ``suffix``; none if it is missing."""
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache(path)  # s3fs caches listings per process; a listing must be current
    try:
        return sorted(p for p in fs.find(path) if p.endswith(suffix))
    except FileNotFoundError:
        return []


def _conform(table: pa.Table) -> pa.Table:
    """A results part in RESULTS_SCHEMA; columns added since it was written become nulls."""
    for field in RESULTS_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(RESULTS_SCHEMA.names).cast(RESULTS_SCHEMA)


def read_results(output: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """All results rows under ``<output>/results/``, one per id (the latest ``finished_at`` wins).

    A part file that cannot be read (e.g. cut short on a filesystem without atomic writes) is
    skipped with a warning: its images will simply be segmented again.
    """
    import pyarrow.parquet as pq

    fs, _ = get_fs(output, storage_options)
    tables = []
    for path in _list_files(join_uri(output, RESULTS_DIR), storage_options, ".parquet"):
        try:
            with fs.open(path, "rb") as f:
                tables.append(_conform(pq.read_table(f)))
        except Exception as err:  # noqa: BLE001 - an unreadable part only costs a redo
            log.warning("skipping unreadable results part %s: %s", path, type(err).__name__)
    if not tables:
        return RESULTS_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    table = table.sort_by([("id", "ascending"), ("finished_at", "ascending")])
    ids = table.column("id").to_numpy(zero_copy_only=False)
    last_of_id = np.append(ids[1:] != ids[:-1], True)
    return table.filter(pa.array(last_of_id))


def finished_ids(output: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Ids whose latest results row is ``ok`` and whose mask exists."""
    results = read_results(output, storage_options)
    ok = {
        row["id"] for row in results.select(["id", "status"]).to_pylist() if row["status"] == STATUS_OK
    }
    if not ok:
        return set()
    masks_uri = join_uri(output, MASKS_DIR)
    _, masks_path = get_fs(masks_uri, storage_options)
    prefix = masks_path.rstrip("/") + "/"
    present = {
        p[len(prefix):-len(MASK_SUFFIX)]
        for p in _list_files(masks_uri, storage_options, MASK_SUFFIX)
        if p.startswith(prefix)
    }
    return ok & present


def read_state(output: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    fs, path = get_fs(join_uri(output, STATE_FILE), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}


def write_state(output: str, watermark: str | None, last_run: Mapping[str, Any],
                storage_options: Mapping[str, Any] | None = None) -> None:
    state = {"watermark": watermark, "last_run": dict(last_run),
             "updated_at": datetime.now(timezone.utc).isoformat()}
    write_atomically(join_uri(output, STATE_FILE), json.dumps(state, indent=2).encode(), storage_options)


def write_parts(output: str, run_id: str, rows: list[dict], errors: list[ErrorRecord],
                storage_options: Mapping[str, Any] | None = None) -> None:
    """One results part and (if any) one errors part, each written atomically; masks first."""
    part = f"{run_id}-{uuid.uuid4().hex[:12]}.parquet"
    if errors:
        data = _parquet_bytes(errors_table(errors))
        write_atomically(join_uri(output, ERRORS_DIR, part), data, storage_options)
    if rows:
        data = _parquet_bytes(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
        write_atomically(join_uri(output, RESULTS_DIR, part), data, storage_options)


def error_row(error: ErrorRecord, run_id: str, model_uri: str) -> dict:
    """The results row of an input that never reached the workers (e.g. an unusable id)."""
    return {
        "id": error.id, "uri": error.uri, "output_uri": None, "overlay_uri": None, "status": STATUS_ERROR,
        "classes": [], "seconds_decode": 0.0, "seconds_model": None, "seconds_crf": None,
        "crf_backend": None, "run_id": run_id, "model_uri": model_uri, "finished_at": datetime.now(timezone.utc),
        "crf_source": None, "crf_params": None,
    }


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputItem:
    id: str
    uri: str
    mask_uri: str = ""


@dataclass
class InputListing:
    items: list[InputItem]
    errors: list[ErrorRecord]  # ids that cannot be output keys, duplicate ids
    read: int  # everything selected for this run (after --since)
    watermark: datetime | None  # newest modification time seen (prefix inputs)


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2024-05-01``, ``2024-05-01T12:00:00Z``, with offset); naive means UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def modified_time(info: Mapping[str, Any]) -> datetime | None:
    """A file's modification time from an fsspec ``info`` dict (s3fs, gcsfs, adlfs, local)."""
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
        if isinstance(value, str):
            return parse_time(value)
    return None


def is_manifest(uri: str) -> bool:
    try:
        table_format(uri)
    except ValueError:
        return False
    return True


def _checked(items: Iterable[InputItem], check_ids: bool) -> tuple[list[InputItem], list[ErrorRecord]]:
    """Drops (as error records) ids that repeat an earlier id or, with ``check_ids``, that are
    unsafe as output keys."""
    kept, errors, seen = [], [], {}
    for item in items:
        try:
            if check_ids:
                check_id(item.id)
        except ValueError as err:
            errors.append(ErrorRecord(item.id, item.uri, "id", f"unusable id: {err}"))
            continue
        if item.id in seen:
            errors.append(ErrorRecord(item.id, item.uri, "id", f"duplicate id (also {seen[item.id]})"))
            continue
        seen[item.id] = item.uri
        kept.append(item)
    return kept, errors


def _is_temporary(name: str) -> bool:
    """Our own in-progress temp files (write_atomically); hidden images are inputs like any other."""
    return name.startswith(TEMP_PREFIX)


def list_inputs(
    input_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    since: datetime | None = None,
    exclude_prefix: str | None = None,
    check_ids: bool = True,
) -> InputListing:
    """The run's inputs: manifest rows, or the images under a prefix (id = relative path without
    the extension). ``since`` keeps prefix files modified at or after it (inclusive, so a file
    written in the watermark's second is not lost; finished ones are skipped anyway).
    ``exclude_prefix`` (the output) is never listed as input. ``check_ids=False`` (nothing will be
    written, e.g. evaluation) keeps ids that would be unsafe output keys."""
    if is_manifest(input_uri):
        if since is not None:
            raise ValueError("--since needs a prefix input (manifest rows carry no modification time)")
        table = read_manifest(input_uri, storage_options)
        rows = table.to_pylist()
        items, errors = _checked((InputItem(r["id"], r["image_uri"], r["mask_uri"] or "") for r in rows),
                                 check_ids)
        return InputListing(items, errors, read=len(rows), watermark=None)

    # A typo must not look like an empty, healthy tick: the bucket (object stores) or the folder
    # (elsewhere) must exist; an existing empty prefix is a success with nothing to do.
    check_access(input_uri, storage_options, must_exist=is_local(input_uri))
    fs, root = get_fs(input_uri, storage_options)
    prefix = root.rstrip("/") + "/"
    excluded = get_fs(exclude_prefix, storage_options)[1].rstrip("/") + "/" if exclude_prefix else None
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    selected, newest = [], None
    for path, info in sorted(found.items()):
        if not path.startswith(prefix) or (excluded and path.startswith(excluded)):
            continue
        relative = path[len(prefix):]
        stem, ext = posixpath.splitext(relative)
        if ext.lower() not in IMAGE_EXTENSIONS or _is_temporary(posixpath.basename(relative)):
            continue
        mtime = modified_time(info)
        if mtime is not None:
            newest = mtime if newest is None else max(newest, mtime)
        if since is not None and mtime is not None and mtime < since:
            continue
        selected.append(InputItem(stem, uri_for(fs, path, input_uri)))
    items, errors = _checked(selected, check_ids)
    return InputListing(items, errors, read=len(selected), watermark=newest)
