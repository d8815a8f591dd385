"""Inputs, outputs and the idempotency contract of batch segmentation.

Outputs under ``--output``::

    masks/<id>.png               palette PNG (VOC colours; pixel values are the class ids)
    overlays/<id>.jpg            with --overlays
    results/<run>.parquet        one row per image {id, uri, output_uri, status, classes, seconds_*}
                                 (older versions wrote results/<run>-<n>.parquet per batch; still read)
    errors/<run>.parquet         ErrorRecord rows {id, uri, stage, reason}
    ledger/, _lease/             what is settled (ledger.py), who is running (lease.py)
    _state.json                  the last run's summary

Idempotency: a mask is written atomically (an object-store PUT, or temp file + rename locally)
and its ledger entry only after it, so an input is settled only once its outcome is recorded; a
re-run processes exactly the unsettled inputs (ledger.py). Reading the results keeps the latest
row per id (:func:`read_results`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipelines.data.errors import ErrorRecord
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
from pipelines.segmentation.ledger import (  # the layout's directory names live with the ledger
    ERRORS_DIR,  # noqa: F401 - part of this module's layout too
    RESULTS_DIR,
    conform,
    latest,
    list_files,
    read_parquet,
)

log = logging.getLogger(__name__)


STATE_FILE = "_state.json"


MASKS_DIR, OVERLAYS_DIR = "masks", "overlays"


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


def read_results(output: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """All results rows under ``<output>/results/`` (one file per run, or per batch from older
    versions), one per id: the latest ``finished_at`` wins. A part that cannot be read (e.g. cut
    short on a filesystem without atomic writes) is skipped with a warning."""
    fs, _ = get_fs(output, storage_options)
    tables = []
    for path in list_files(join_uri(output, RESULTS_DIR), storage_options):
        try:
            tables.append(conform(read_parquet(fs, path), RESULTS_SCHEMA))
        except Exception as err:  # noqa: BLE001 - an unreadable part only loses its rows from the view
            log.warning("skipping unreadable results part %s: %s", path, type(err).__name__)
    if not tables:
        return RESULTS_SCHEMA.empty_table()
    return latest(pa.concat_tables(tables), ["id"], "finished_at")


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
        for p in list_files(masks_uri, storage_options, MASK_SUFFIX)
        if p.startswith(prefix)
    }
    return ok & present


def migrate_to_ledger(output: str, run_id: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """An output written by a version without a ledger: its finished images (an ``ok`` results
    row and its mask) become settled entries, once, so the switch re-segments nothing. Errors
    are left out (retried as before). Returns how many entries were written."""
    from pipelines.segmentation import ledger

    done = finished_ids(output, storage_options)
    if not done:
        return 0
    rows = [r for r in read_results(output, storage_options).select(["id", "uri", "finished_at"]).to_pylist()
            if r["id"] in done]
    entries = [ledger.ledger_row(r["id"], r["uri"], None, None, None, STATUS_OK, None, None, 0, 1, run_id,
                                 r["finished_at"]) for r in rows]
    ledger.write_entries(output, f"{ledger.COMPACT_PREFIX}migrated-{run_id}", entries, storage_options)
    return len(entries)


def read_state(output: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    fs, path = get_fs(join_uri(output, STATE_FILE), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}


def write_state(output: str, last_run: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> None:
    state = {"last_run": dict(last_run), "updated_at": datetime.now(timezone.utc).isoformat()}
    write_atomically(join_uri(output, STATE_FILE), json.dumps(state, indent=2).encode(), storage_options)


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
    # As listed (prefix inputs): what the ledger compares to tell a changed input.
    size: int | None = None
    etag: str | None = None
    mtime: datetime | None = None

    def row(self) -> dict:
        """The row the stages see (no listing details)."""
        return {"id": self.id, "uri": self.uri, "mask_uri": self.mask_uri}


@dataclass
class InputListing:
    items: list[InputItem]
    errors: list[ErrorRecord]  # ids that cannot be output keys, duplicate ids
    read: int  # everything selected for this run (after --since)
    rejected: list[InputItem] = field(default_factory=list)  # the items of ``errors``, in order


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


def _checked(items: Iterable[InputItem], check_ids: bool, read: int) -> InputListing:
    """Drops (as error records) ids that repeat an earlier id or, with ``check_ids``, that are
    unsafe as output keys."""
    listing, seen = InputListing([], [], read), {}
    for item in items:
        reason = None
        try:
            if check_ids:
                check_id(item.id)
        except ValueError as err:
            reason = f"unusable id: {err}"
        if reason is None and item.id in seen:
            reason = f"duplicate id (also {seen[item.id]})"
        if reason is not None:
            listing.errors.append(ErrorRecord(item.id, item.uri, "id", reason))
            listing.rejected.append(item)
            continue
        seen[item.id] = item.uri
        listing.items.append(item)
    return listing


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
    the extension). ``since`` (an explicit ``--since`` time) keeps prefix files modified at or
    after it.
    ``exclude_prefix`` (the output) is never listed as input. ``check_ids=False`` (nothing will be
    written, e.g. evaluation) keeps ids that would be unsafe output keys."""
    if is_manifest(input_uri):
        if since is not None:
            raise ValueError("--since needs a prefix input (manifest rows carry no modification time)")
        table = read_manifest(input_uri, storage_options)
        rows = table.to_pylist()
        return _checked((InputItem(r["id"], r["image_uri"], r["mask_uri"] or "") for r in rows), check_ids,
                        read=len(rows))

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
    single = found.get(root.rstrip("/"))
    if single is not None and single.get("type") == "file":  # one image as the input: its folder is the prefix
        prefix, found = posixpath.dirname(root.rstrip("/")) + "/", {root.rstrip("/"): single}
    plain = is_local(input_uri) and "://" not in str(input_uri)  # uri_for, decided once
    selected = []
    for path, info in sorted(found.items()):
        if not path.startswith(prefix) or (excluded and path.startswith(excluded)):
            continue
        relative = path[len(prefix):]
        stem, ext = posixpath.splitext(relative)
        if ext.lower() not in IMAGE_EXTENSIONS or _is_temporary(posixpath.basename(relative)):
            continue
        mtime = modified_time(info)
        if since is not None and mtime is not None and mtime < since:
            continue
        size = info.get("size", info.get("Size"))
        selected.append(InputItem(stem, path if plain else uri_for(fs, path, input_uri),
                                  size=int(size) if size is not None else None,
                                  etag=_etag(info), mtime=mtime))
    return _checked(selected, check_ids, read=len(selected))


def _etag(info: Mapping[str, Any]) -> str | None:
    """The object's ETag (S3, GCS, Azure) as listed, without quotes; None on plain filesystems."""
    for key in ("ETag", "etag", "md5Hash"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None
