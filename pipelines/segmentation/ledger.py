"""The ledger: which inputs an output has settled, so a scheduled run processes exactly the rest.

Layout under ``--output``::

    ledger/<run>.parquet            the inputs one run settled (written at its end)
    ledger/c-<run>.parquet          a compaction: the latest entry of every input so far
    ledger/pending/<run>-<n>.parquet  a running run's checkpoints (folded in at its end, or by
                                    the next run if it was killed)
    results/<run>.parquet           the run's results rows (one file per run)

An entry is ``(id, uri)`` with the input's ``size``, ``etag`` and ``mtime`` as listed, the outcome
(``ok`` / ``error`` with stage, reason and ``kind``: ``transient`` or ``permanent``), how many
consecutive transient failures it has had (``attempts``), and when and by which run it was
settled. The latest entry (``settled_at``) of an input wins. A run reads the ledger once (one
listing of ``ledger/`` and one read per file; compaction keeps the files at most
``max_files``), lists the inputs once, and processes every listed input that is

- not in the ledger (whatever its modification time: an old file copied in late, or one dated in
  the future, is just another unsettled input);
- in it with a transient error and fewer than ``max_attempts`` attempts;
- in it, but listed with another size / etag (mtime where the store has no etag), when changed
  inputs are reprocessed (the default).

A mask is written before its ledger entry, so an ``ok`` entry always has its mask.
"""

from __future__ import annotations

import io
import posixpath
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.common.uris import join_uri
from pipelines.data.storage import get_fs, write_atomically


LEDGER_DIR, PENDING_DIR, RESULTS_DIR, ERRORS_DIR = "ledger", "pending", "results", "errors"
COMPACT_PREFIX = "c-"
TRANSIENT, PERMANENT = "transient", "permanent"
# Stages whose errors are properties of the input itself; the rest (read, write, model, crf, a
# worker lost) can go away on their own and are retried on later runs.
PERMANENT_STAGES = frozenset({"id", "image", "mask"})

LEDGER_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("status", pa.string()),  # ok / error
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("kind", pa.string()),  # transient / permanent (errors only)
    ("attempts", pa.int32()),  # consecutive transient failures so far
    ("run_id", pa.string()),
    ("settled_at", pa.timestamp("us", tz="UTC")),
    # What made the entry (provenance.py); null in entries of older versions.
    ("model", pa.string()),  # models:/name/<version>, runs:/..., or sha256:<weights>
    ("settings", pa.string()),  # scales, flip, fusion, CRF set, overlays (canonical JSON)
    ("crf_backend", pa.string()),  # the CRF backend that ran (ok entries with a CRF)
])


def error_kind(stage: str) -> str:
    return PERMANENT if stage in PERMANENT_STAGES else TRANSIENT


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def parquet_table(data: bytes) -> pa.Table:
    """A parquet file's table from its bytes (ParquetFile: pq.read_table would import
    pyarrow.dataset, and with it pandas, half a second of a no-op tick)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(pa.BufferReader(data)).read()


def read_parquet(fs, path: str) -> pa.Table:
    """One GET per file (``cat_file``), not an open + ranged reads."""
    return parquet_table(fs.cat_file(path))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``; columns it lacks (written by an older version) become nulls."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def latest(table: pa.Table, keys: Sequence[str], order: str) -> pa.Table:
    """One row per ``keys`` value: the one with the greatest ``order`` (sorted, then neighbours
    compared with pyarrow compute: no Python object per row)."""
    import pyarrow.compute as pc

    if table.num_rows < 2:
        return table
    table = table.take(pc.sort_indices(table, [*((k, "ascending") for k in keys), (order, "ascending")]))
    same = np.ones(table.num_rows - 1, bool)
    for key in keys:
        values = table.column(key)
        head, tail = values.slice(0, table.num_rows - 1), values.slice(1)
        equal = pc.or_kleene(pc.equal(head, tail), pc.and_(pc.is_null(head), pc.is_null(tail)))
        same &= pc.fill_null(equal, False).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(np.append(~same, True)))


def list_files(uri: str, storage_options: Mapping[str, Any] | None, suffix: str = ".parquet") -> list[str]:
    """Paths (inside the filesystem) under ``uri`` ending in ``suffix`` (one listing); none if it
    does not exist."""
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache(path)  # s3fs caches listings per process; a listing must be current
    try:
        return sorted(p for p in fs.find(path) if p.endswith(suffix))
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------- reading


@dataclass
class LedgerFiles:
    settled: list[str]  # ledger/*.parquet (compacted and per run)
    pending: dict[str, list[str]]  # run id -> its checkpoint parts


def ledger_files(output: str, storage_options: Mapping[str, Any] | None = None) -> LedgerFiles:
    fs, root = get_fs(join_uri(output, LEDGER_DIR), storage_options)
    pending_root = posixpath.join(root, PENDING_DIR) + "/"
    settled, pending = [], {}
    for path in list_files(join_uri(output, LEDGER_DIR), storage_options):
        if path.startswith(pending_root):
            run = posixpath.basename(path)[:-len(".parquet")].rsplit("-", 1)[0]
            pending.setdefault(run, []).append(path)
        else:
            settled.append(path)
    return LedgerFiles(settled, pending)


def read_ledger(output: str, storage_options: Mapping[str, Any] | None = None,
                files: LedgerFiles | None = None) -> pa.Table:
    """Every input's latest entry (checkpoints of killed runs included). The files are fetched
    together (concurrent GETs on object stores); a lone compaction is taken as it is (it holds
    one entry per input by construction)."""
    fs, _ = get_fs(output, storage_options)
    files = files or ledger_files(output, storage_options)
    paths = files.settled + [p for parts in files.pending.values() for p in parts]
    if not paths:
        return LEDGER_SCHEMA.empty_table()
    blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    tables = [conform(parquet_table(blobs[p]), LEDGER_SCHEMA) for p in paths]
    if len(paths) == 1 and posixpath.basename(paths[0]).startswith(COMPACT_PREFIX):
        return tables[0]
    return latest(pa.concat_tables(tables), ["id", "uri"], "settled_at")


# --------------------------------------------------------------------------- selection


def match(listed: pa.Table, settled: pa.Table) -> pa.Array:
    """For each listed row, the row of ``settled`` with its ``(id, uri)``, null where none: a hash
    lookup of the uri (``index_in``), then the ids compared; a uri settled under several ids (a
    manifest may name one image twice) is looked up by both keys, for those rows only."""
    import pyarrow.compute as pc

    n = listed.num_rows
    if settled.num_rows == 0:
        return pa.nulls(n, pa.int64())
    index = pc.fill_null(pc.index_in(listed["uri"], value_set=settled["uri"]), -1).to_numpy(zero_copy_only=False)
    index = index.astype(np.int64)
    found = np.flatnonzero(index >= 0)
    same = pc.equal(listed["id"].take(found), settled["id"].take(index[found]))
    other = found[~pc.fill_null(same, False).to_numpy(zero_copy_only=False)]
    if other.size:
        left = listed.select(["id", "uri"]).take(other).append_column("row", pa.array(other))
        right = settled.select(["id", "uri"]).append_column("match", pa.array(np.arange(settled.num_rows)))
        joined = left.join(right, keys=["id", "uri"], join_type="left outer")
        index[joined["row"].to_numpy()] = pc.fill_null(joined["match"], -1).to_numpy()
    return pa.array(index, mask=index < 0)


def select(listed: pa.Table, settled: pa.Table, *, max_attempts: int, reprocess_changed: bool,
           retry_errors: bool, index: pa.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which listed inputs a run processes, and their transient attempts so far (two arrays in
    the order of ``listed``: columns ``id, uri, size, etag, mtime``). Vectorised: a tick at 100k
    settled inputs is one hash lookup, not 100k Python lookups (``index``: :func:`match`'s, if the
    caller has it already)."""
    import pyarrow.compute as pc

    n = listed.num_rows
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    index = match(listed, settled) if index is None else index
    entry = settled.select(["size", "etag", "mtime", "status", "kind", "attempts"]).take(index)

    def differs(column: str) -> pa.ChunkedArray:  # unknown on either side never counts
        return pc.fill_null(pc.not_equal(listed[column], entry[column]), False)

    etags_known = pc.and_(pc.is_valid(listed["etag"]), pc.is_valid(entry["etag"]))
    changed = pc.or_(differs("size"), pc.if_else(etags_known, differs("etag"), differs("mtime")))
    new = pc.is_null(entry["status"]).to_numpy(zero_copy_only=False)
    changed = changed.to_numpy(zero_copy_only=False) & bool(reprocess_changed) & ~new
    ok = pc.fill_null(pc.equal(entry["status"], "ok"), False).to_numpy(zero_copy_only=False)
    attempts = pc.fill_null(entry["attempts"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
    transient = pc.fill_null(pc.equal(entry["kind"], TRANSIENT), False).to_numpy(zero_copy_only=False)
    retry = ~new & ~ok & (bool(retry_errors) | (transient & (attempts < max_attempts)))
    fresh = new | changed | (retry & bool(retry_errors))  # attempts start again
    return new | changed | retry, np.where(fresh, 0, attempts)


def listed_table(items: Sequence[Any]) -> pa.Table:
    """``id, uri, size, etag, mtime`` of listed inputs (objects with those attributes)."""
    return pa.table({
        "id": pa.array([i.id for i in items], pa.string()),
        "uri": pa.array([i.uri for i in items], pa.string()),
        "size": pa.array([i.size for i in items], pa.int64()),
        "etag": pa.array([i.etag for i in items], pa.string()),
        "mtime": pa.array([i.mtime for i in items], pa.timestamp("us", tz="UTC")),
    })


# --------------------------------------------------------------------------- writing


def ledger_row(record_id: str, uri: str, size: int | None, etag: str | None, mtime: datetime | None,
               status: str, stage: str | None, reason: str | None, attempts_before: int, max_attempts: int,
               run_id: str, settled_at: datetime | None = None, model: str | None = None,
               settings: str | None = None, crf_backend: str | None = None) -> dict:
    """The entry of one outcome; a transient error that used up its attempts becomes permanent."""
    kind, attempts = None, 0
    if status != "ok":
        kind = error_kind(stage or "")
        if kind == TRANSIENT:
            attempts = attempts_before + 1
            if attempts >= max_attempts:
                kind = PERMANENT
                reason = f"gave up after {attempts} attempts: {reason}"
    return {"id": record_id, "uri": uri, "size": size, "etag": etag, "mtime": mtime, "status": status,
            "stage": stage or None, "reason": reason or None, "kind": kind, "attempts": attempts,
            "run_id": run_id, "settled_at": settled_at or datetime.now(timezone.utc),
            "model": model, "settings": settings, "crf_backend": crf_backend}


class RunRecorder:
    """Collects a run's results and ledger rows; checkpoints them every ``flush_rows`` rows or
    ``flush_s`` seconds (a killed run loses at most that), and writes one results file and one
    ledger file at the end."""

    def __init__(self, output: str, run_id: str, results_schema: pa.Schema,
                 storage_options: Mapping[str, Any] | None = None, flush_rows: int = 2000,
                 flush_s: float = 60.0) -> None:
        self.output, self.run_id, self.results_schema = output, run_id, results_schema
        self.storage_options = storage_options
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.results: list[dict] = []
        self.ledger: list[dict] = []
        self.parts: list[str] = []
        self._unflushed = 0
        self._last_flush = time.monotonic()

    def add(self, results: Iterable[dict], ledger: Iterable[dict]) -> None:
        results, ledger = list(results), list(ledger)
        self.results += results
        self.ledger += ledger
        self._unflushed += len(ledger)
        if self._unflushed and (self._unflushed >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_s):
            self.flush()

    def flush(self) -> None:
        """A checkpoint part with everything since the last one: results and ledger columns."""
        if not self._unflushed:
            return
        start = len(self.ledger) - self._unflushed
        table = _combined(self.results[start:], self.ledger[start:], self.results_schema)
        uri = join_uri(self.output, LEDGER_DIR, PENDING_DIR, f"{self.run_id}-{len(self.parts):06d}.parquet")
        write_atomically(uri, parquet_bytes(table), self.storage_options)
        self.parts.append(uri)
        self._unflushed, self._last_flush = 0, time.monotonic()

    def finish(self) -> None:
        """The run's results file, then its ledger file, then the checkpoints go."""
        if not self.ledger:
            return
        table = _combined(self.results, self.ledger, self.results_schema)
        settle(self.output, self.run_id, table, self.results_schema, self.storage_options)
        _remove(self.output, [get_fs(u, self.storage_options)[1] for u in self.parts], self.storage_options)


def _combined(results: list[dict], ledger: list[dict], results_schema: pa.Schema) -> pa.Table:
    """Results rows and ledger rows side by side (ledger columns prefixed ``ledger_``)."""
    table = pa.Table.from_pylist(results, schema=results_schema)
    entries_table = pa.Table.from_pylist(ledger, schema=LEDGER_SCHEMA)
    for name in LEDGER_SCHEMA.names:
        table = table.append_column("ledger_" + name, entries_table.column(name))
    return table


def _split(table: pa.Table, results_schema: pa.Schema) -> tuple[pa.Table, pa.Table]:
    names = [n for n in LEDGER_SCHEMA.names if "ledger_" + n in table.column_names]  # older parts lack some
    ledger = conform(table.select(["ledger_" + n for n in names]).rename_columns(names), LEDGER_SCHEMA)
    return conform(table.select([n for n in results_schema.names if n in table.column_names]),
                   results_schema), ledger


def settle(output: str, run_id: str, combined: pa.Table, results_schema: pa.Schema,
           storage_options: Mapping[str, Any] | None) -> None:
    """A run's results file and errors file, then its ledger file (the entries last: what they
    record is then in place)."""
    import pyarrow.compute as pc

    from pipelines.data.errors import ERROR_SCHEMA

    results, ledger = _split(combined, results_schema)
    write_atomically(join_uri(output, RESULTS_DIR, f"{run_id}.parquet"), parquet_bytes(results), storage_options)
    errors = ledger.filter(pc.equal(ledger.column("status"), "error"))
    if errors.num_rows:
        errors = errors.select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)
        write_atomically(join_uri(output, ERRORS_DIR, f"{run_id}.parquet"), parquet_bytes(errors), storage_options)
    write_atomically(join_uri(output, LEDGER_DIR, f"{run_id}.parquet"), parquet_bytes(ledger), storage_options)


def _remove(output: str, paths: Iterable[str], storage_options) -> None:
    paths = list(paths)
    if paths:
        fs, _ = get_fs(output, storage_options)
        fs.rm(paths)


def fold_pending(output: str, files: LedgerFiles, results_schema: pa.Schema,
                 storage_options: Mapping[str, Any] | None = None) -> int:
    """Settles the checkpoints of runs that were killed (call with the lease held: no other run
    is writing). A run killed after its ledger file was written only left its checkpoints (a
    subset of that file) behind: they just go. Returns how many runs were folded in."""
    fs, _ = get_fs(output, storage_options)
    finished = {posixpath.basename(p)[:-len(".parquet")] for p in files.settled}
    for run_id, parts in files.pending.items():
        if run_id not in finished:
            table = pa.concat_tables([read_parquet(fs, p) for p in parts], promote_options="default")
            settle(output, run_id, table, results_schema, storage_options)
        _remove(output, parts, storage_options)
    return len(files.pending)


def compact(output: str, run_id: str, files: Sequence[str], max_files: int,
            storage_options: Mapping[str, Any] | None = None) -> bool:
    """With more than ``max_files`` ledger files, one file of the latest entries replaces them
    (written first, the old ones removed after: a crash in between only leaves duplicates)."""
    if len(files) <= max_files:
        return False
    fs, _ = get_fs(output, storage_options)
    table = latest(pa.concat_tables([conform(read_parquet(fs, p), LEDGER_SCHEMA) for p in files]),
                   ["id", "uri"], "settled_at")
    uri = join_uri(output, LEDGER_DIR, f"{COMPACT_PREFIX}{run_id}.parquet")
    write_atomically(uri, parquet_bytes(table), storage_options)
    target = get_fs(uri, storage_options)[1]
    _remove(output, [p for p in files if p != target], storage_options)
    return True


def write_entries(output: str, name: str, rows: list[dict] | pa.Table,
                  storage_options: Mapping[str, Any] | None = None) -> str:
    """A ledger file from entries (the migration of older outputs; benchmarks)."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
    uri = join_uri(output, LEDGER_DIR, f"{name}.parquet")
    write_atomically(uri, parquet_bytes(conform(table, LEDGER_SCHEMA)), storage_options)
    return uri
