"""Accounting for bad input: error records, the errors manifest, and the run summary.

A job never crashes on one bad file and never drops one silently: every input ends up either in
the job's output or as an :class:`ErrorRecord` in ``errors.parquet`` next to it, and the
:class:`RunSummary` checks ``read == ok + errors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipelines.data.storage import read_table, write_table

ERRORS_FILE = "errors.parquet"
ERROR_SCHEMA = pa.schema(
    [("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


@dataclass(frozen=True)
class ErrorRecord:
    """One input that could not be used: which row, which file, at which stage, and why.

    ``stage`` is ``"read"`` (the file could not be fetched), ``"image"`` / ``"mask"`` (decoding or
    validation failed, see ``pipelines.data.decode.BadInput``), or a job-specific later stage.
    """

    id: str
    uri: str
    stage: str
    reason: str


@dataclass(frozen=True)
class RunSummary:
    """Counts of one pass over a manifest; ``read == ok + errors`` is enforced."""

    read: int
    ok: int
    errors: int

    def __post_init__(self) -> None:
        if min(self.read, self.ok, self.errors) < 0:
            raise ValueError(f"negative count in {self}")
        if self.read != self.ok + self.errors:
            raise ValueError(
                f"inputs unaccounted for: read={self.read} != ok={self.ok} + errors={self.errors}"
            )

    def __str__(self) -> str:
        return f"read={self.read} ok={self.ok} errors={self.errors}"

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def errors_table(records: Iterable[ErrorRecord] | pa.Table) -> pa.Table:
    """``records`` as a table with the errors schema (``id, uri, stage, reason``)."""
    if isinstance(records, pa.Table):
        return records.select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)
    columns: dict[str, list[str]] = {name: [] for name in ERROR_SCHEMA.names}
    for record in records:
        for name in ERROR_SCHEMA.names:
            columns[name].append(getattr(record, name))
    return pa.table(columns, schema=ERROR_SCHEMA)


def write_errors(
    records: Iterable[ErrorRecord] | pa.Table,
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Writes the errors manifest (parquet by default; CSV/JSONL by extension); an empty one too,
    so that "no errors" is recorded rather than implied."""
    return write_table(errors_table(records), uri, storage_options)


def read_errors(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[ErrorRecord]:
    table = read_table(uri, storage_options, string_columns=tuple(ERROR_SCHEMA.names))
    missing = set(ERROR_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{uri} is not an errors manifest: missing columns {sorted(missing)}")
    return [ErrorRecord(**row) for row in errors_table(table).to_pylist()]
