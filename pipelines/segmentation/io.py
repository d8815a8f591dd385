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
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.errors import ErrorRecord
from pipelines.common.uris import is_local, join_uri
from pipelines.data.manifest import IMAGE_EXTENSIONS, MANIFEST_SCHEMA, read_manifest, validate_table
from pipelines.data.storage import TEMP_PREFIX, check_access, get_fs, table_format, uri_for, write_atomically
from pipelines.segmentation.ledger import (  # the layout's directory names live with the ledger
    ERRORS_DIR,  # noqa: F401 - part of this module's layout too
    RESULTS_DIR,
    conform,
    latest,
    list_files,
    parquet_table,
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


def is_feed(uri: str) -> bool:
    """A glob of manifests (``s3://b/feed/*.parquet``): the inputs are every row of every match."""
    return is_manifest(uri) and re.search(r"[*?\[]", uri) is not None


def read_feed(pattern: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The rows of every manifest matching ``pattern`` (in name order), a row repeated by a later
    manifest dropped (event notifications arrive at least once). The feed is what an upstream
    writer delivers (one manifest of new keys per batch): with the ledger skipping settled rows, a
    tick never lists the images, only the feed folder (one LIST per 1,000 manifests) and one GET
    per manifest. No match is an empty tick, once the bucket / parent folder is known to exist."""
    fs, path = get_fs(pattern, storage_options)
    folder = path[:re.search(r"[*?\[]", path).start()].rsplit("/", 1)[0] or "/"
    check_access(uri_for(fs, folder, pattern), storage_options, must_exist=is_local(pattern))
    fs.invalidate_cache()  # s3fs caches listings per process; the feed must be current
    paths = sorted(p for p in fs.glob(path) if not p.rsplit("/", 1)[-1].startswith(TEMP_PREFIX))
    if not paths:
        return MANIFEST_SCHEMA.empty_table()
    if all(table_format(p) == "parquet" for p in paths):  # concurrent GETs, one per manifest
        blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
        tables = [validate_table(parquet_table(blobs[p]), source=uri_for(fs, p, pattern)) for p in paths]
    else:
        tables = [read_manifest(uri_for(fs, p, pattern), storage_options) for p in paths]
    table = pa.concat_tables(tables)
    if len(tables) > 1:  # the first row of each (id, image_uri); another uri under a known id stays
        key = pc.binary_join_element_wise(table["id"], table["image_uri"], "\x00")
        first = pc.index_in(key, value_set=key)  # index_in finds a value's first row
        table = table.filter(pc.equal(first, pa.array(np.arange(table.num_rows), pa.int32())))
    return table


# The listed table: what the ledger compares and what becomes InputItems (only for the rows a run
# processes: at 100k settled inputs a no-op tick builds no per-input Python object).
LISTED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("mask_uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", pa.timestamp("us", tz="UTC")),
])

# An image file as posixpath.splitext sees it: the extension is the last ".xyz" of the base name,
# not one made only of the name's leading dots (".jpg" has none); case-insensitive.
_IMAGE_PATH = r"(?i)(^|/)\.*[^./][^/]*\.(" + "|".join(re.escape(e[1:]) for e in IMAGE_EXTENSIONS) + r")$"
_TEMPORARY_PATH = r"(^|/)" + re.escape(TEMP_PREFIX) + r"[^/]*$"  # write_atomically's in-progress files


def list_input_table(
    input_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    since: datetime | None = None,
    exclude_prefix: str | None = None,
) -> pa.Table:
    """The run's inputs as a table (:data:`LISTED_SCHEMA`): manifest rows in order, or the images
    under a prefix sorted by path (id = relative path without the extension). ``since`` (an
    explicit ``--since`` time) keeps prefix files modified at or after it; ``exclude_prefix`` (the
    output) is never listed. One listing, filtered with pyarrow compute; ids are checked later,
    and only for the rows a run processes (:func:`checked_items`)."""
    if is_manifest(input_uri):
        if since is not None:
            raise ValueError("--since needs a prefix input (manifest rows carry no modification time)")
        table = read_feed(input_uri, storage_options) if is_feed(input_uri) else read_manifest(input_uri, storage_options)
        n = table.num_rows
        return pa.table([table["id"], table["image_uri"], pc.fill_null(table["mask_uri"], ""),
                         pa.nulls(n, pa.int64()), pa.nulls(n, pa.string()),
                         pa.nulls(n, LISTED_SCHEMA.field("mtime").type)], schema=LISTED_SCHEMA)

    # A typo must not look like an empty, healthy tick: the bucket (object stores) or the folder
    # (elsewhere) must exist; an existing empty prefix is a success with nothing to do.
    check_access(input_uri, storage_options, must_exist=is_local(input_uri))
    fs, root = get_fs(input_uri, storage_options)
    prefix = root.rstrip("/") + "/"
    found = _walk_local(root) if is_local(input_uri) else _list_store(fs, root)
    single = root.rstrip("/")
    if found.num_rows == 1 and found["path"][0].as_py() == single:  # one image as the input: its folder is the prefix
        prefix = posixpath.dirname(single) + "/"
    path = found["path"]
    keep = pc.and_(pc.starts_with(path, prefix), pc.match_substring_regex(path, _IMAGE_PATH))
    keep = pc.and_not(keep, pc.match_substring_regex(path, _TEMPORARY_PATH))
    if exclude_prefix:
        excluded = get_fs(exclude_prefix, storage_options)[1].rstrip("/") + "/"
        keep = pc.and_not(keep, pc.starts_with(path, excluded))
    if since is not None:  # an unknown time keeps the file
        keep = pc.and_(keep, pc.fill_null(pc.greater_equal(found["mtime"], pa.scalar(since, found["mtime"].type)),
                                          True))
    found = found.filter(keep)
    found = found.take(pc.sort_indices(found, [("path", "ascending")]))
    path = found["path"]
    relative = pc.replace_substring(path, pattern=prefix, replacement="", max_replacements=1)
    ids = pc.replace_substring_regex(relative, pattern=r"\.[^./]*$", replacement="", max_replacements=1)
    plain = is_local(input_uri) and "://" not in str(input_uri)  # uri_for, decided once
    if not plain:
        head = uri_for(fs, root, input_uri)
        head = head[:-len(root)] if head.endswith(root) else None
        path = pc.binary_join_element_wise(head, path, "") if head is not None else pa.array(
            [uri_for(fs, p, input_uri) for p in path.to_pylist()], pa.string())
    return pa.table([ids, path, pa.repeat(pa.scalar("", pa.string()), found.num_rows), found["size"],
                     found["etag"], found["mtime"]], schema=LISTED_SCHEMA)


def _walk_local(root: str) -> pa.Table:
    """Every file under ``root`` with its size and mtime: an os.scandir walk, one lstat per file,
    none of the per-file dicts fsspec's find builds (a third of a 100k-file tick went there).
    What it lists is what find listed: links are not followed into directories; a link's mtime
    is its own, its size its target's (0 when the target is missing: listed, it fails its read
    as a transient error and is retried)."""
    paths, sizes, mtimes = [], [], []
    if os.path.isfile(root):  # one image as the input
        stat = os.stat(root)
        return pa.table({"path": pa.array([root], pa.string()), "size": pa.array([stat.st_size], pa.int64()),
                         "etag": pa.nulls(1, pa.string()), "mtime": timestamps_us([stat.st_mtime])})
    stack = [root]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except OSError:  # gone since the directory was read
                    continue
                size = stat.st_size
                if entry.is_symlink():
                    try:
                        size = entry.stat().st_size
                    except OSError:
                        size = 0
                paths.append(entry.path)
                sizes.append(size)
                mtimes.append(stat.st_mtime)
    return pa.table({"path": pa.array(paths, pa.string()), "size": pa.array(sizes, pa.int64()),
                     "etag": pa.nulls(len(paths), pa.string()), "mtime": timestamps_us(mtimes)})


def timestamps_us(seconds: Sequence[float]) -> pa.Array:
    """POSIX float times as UTC microsecond timestamps, rounded exactly as
    ``datetime.fromtimestamp`` rounds them (half to even on the fraction): ledgers written from
    fsspec's float mtimes must compare equal, or every local input would look changed."""
    t = np.asarray(seconds, dtype=np.float64)
    frac, whole = np.modf(t)
    micros = np.rint(frac * 1e6)
    whole = whole + np.where(micros >= 1e6, 1, 0) - np.where(micros < 0, 1, 0)
    micros = np.where(micros >= 1e6, micros - 1e6, np.where(micros < 0, micros + 1e6, micros))
    values = whole.astype(np.int64) * 1_000_000 + micros.astype(np.int64)
    return pa.array(values, pa.timestamp("us", tz="UTC"))


def _list_store(fs, root: str) -> pa.Table:
    """Every object under ``root`` (an object store, or any other fsspec filesystem) with its size,
    ETag and modification time, from one recursive listing (S3: ListObjectsV2, 1000 keys a page)."""
    fs.invalidate_cache(root)  # s3fs caches listings per process; this one must be current
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    infos = list(found.values())
    sizes = [info.get("size", info.get("Size")) for info in infos]
    return pa.table({"path": pa.array(list(found), pa.string()),
                     "size": pa.array([int(s) if s is not None else None for s in sizes], pa.int64()),
                     "etag": pa.array([_etag(info) for info in infos], pa.string()),
                     "mtime": pa.array([modified_time(info) for info in infos], pa.timestamp("us", tz="UTC"))})


def checked_items(listed: pa.Table, rows: Sequence[int] | np.ndarray,
                  check_ids: bool = True) -> list[tuple[InputItem, ErrorRecord | None]]:
    """The InputItems of ``rows`` of a listed table, each with an error record if its id is
    unsafe as an output key (``check_ids``) or repeats the id of an earlier row (the first row
    with an id keeps it). The rows a run does not process are never looked at one by one."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    ids = listed.column("id")
    first = pc.index_in(ids.take(rows), value_set=ids).to_numpy(zero_copy_only=False)
    uris = listed.column("uri")
    out = []
    for row, first_row, r in zip(rows, first, listed.take(rows).to_pylist()):
        item = InputItem(r["id"], r["uri"], r["mask_uri"] or "", r["size"], r["etag"], r["mtime"])
        reason = None
        try:
            if check_ids:
                check_id(item.id)
        except ValueError as err:
            reason = f"unusable id: {err}"
        if reason is None and first_row != row:
            reason = f"duplicate id (also {uris[int(first_row)].as_py()})"
        out.append((item, ErrorRecord(item.id, item.uri, "id", reason) if reason else None))
    return out


def list_inputs(
    input_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    since: datetime | None = None,
    exclude_prefix: str | None = None,
    check_ids: bool = True,
) -> InputListing:
    """:func:`list_input_table` as InputItems, the unusable and duplicate ids apart as error
    records. ``check_ids=False`` (nothing will be written, e.g. evaluation) keeps ids that would
    be unsafe output keys."""
    table = list_input_table(input_uri, storage_options, since=since, exclude_prefix=exclude_prefix)
    listing = InputListing([], [], read=table.num_rows)
    for item, error in checked_items(table, np.arange(table.num_rows), check_ids):
        if error is None:
            listing.items.append(item)
        else:
            listing.errors.append(error)
            listing.rejected.append(item)
    return listing


def _etag(info: Mapping[str, Any]) -> str | None:
    """The object's ETag (S3, GCS, Azure) as listed, without quotes; None on plain filesystems."""
    for key in ("ETag", "etag", "md5Hash"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None
