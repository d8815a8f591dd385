"""The no-op tick's fast path (no Ray): the vectorised listing lists what fsspec's find listed,
with the same times to the microsecond; only the rows a run processes become Python objects and
have their ids checked; the ledger lookup keeps (id, uri) exact; and a tick with nothing to do
imports neither torch nor Ray."""

from __future__ import annotations

import json
import os
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.data.manifest import IMAGE_EXTENSIONS
from pipelines.segmentation import ledger
from pipelines.segmentation.io import (
    checked_items,
    list_input_table,
    modified_time,
    timestamps_us,
)
from tests.helpers import run_off_cluster

NAMES = ("a.jpg", "b.PNG", "c.tiff", ".hidden.jpg", "x/.jpg", "x/..jpg", "x/.a.jpg", "a..jpg", "e.tar.png",
         "d.jpg.txt", "k.jpgx", "j.", "noext", "deep/er/f.webp", "dots.in/dir/g.bmp", ".tmp-0123abcd",
         "x/.tmp-9.jpg", "out/masks/m.png", "é/ü.jpeg", "dup.jpg", "dup.png")


def fsspec_listing(root: Path, exclude: Path) -> list[tuple]:
    """What the listing was before it was vectorised: fsspec's find, one Python pass per file."""
    import posixpath

    import fsspec

    fs = fsspec.filesystem("file")
    prefix, excluded = str(root) + "/", str(exclude) + "/"
    rows = []
    for path, info in sorted(fs.find(str(root), detail=True).items()):
        relative = path[len(prefix):]
        stem, ext = posixpath.splitext(relative)
        if path.startswith(excluded) or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if posixpath.basename(relative).startswith(".tmp-"):
            continue
        rows.append((stem, path, info["size"], modified_time(info)))
    return rows


def test_the_vectorised_listing_lists_what_fsspec_listed(tmp_path):
    root = tmp_path / "in"
    for i, name in enumerate(NAMES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * i)
        when = 1_700_000_000 + i * 0.3333337  # fractions that round both ways
        os.utime(path, (when, when))
    table = list_input_table(str(root), exclude_prefix=str(root / "out"))
    got = list(zip(*(table[c].to_pylist() for c in ("id", "uri", "size", "mtime"))))
    assert got == fsspec_listing(root, root / "out")
    assert [r[0] for r in got][:3] == [".hidden", "a.", "a"] and "é/ü" in table["id"].to_pylist()
    since = datetime.fromtimestamp(1_700_000_000 + 10 * 0.3333337, tz=timezone.utc)
    recent = list_input_table(str(root), since=since, exclude_prefix=str(root / "out"))
    assert recent.num_rows and all(t >= since for t in recent["mtime"].to_pylist())
    assert recent.num_rows < table.num_rows


def test_times_round_as_datetime_does():
    rng = random.Random(0)
    values = [rng.uniform(-2e9, 4e9) for _ in range(20000)]
    values += [1.5e-6, 2.5e-6, 1_700_000_000.0000005, -0.0000005, -1.9999995, 0.9999996, -1e-7]
    expected = [datetime.fromtimestamp(v, tz=timezone.utc) for v in values]
    assert timestamps_us(values).to_pylist() == expected


def test_only_the_rows_a_run_processes_are_checked(tmp_path):
    listed = pa.table({"id": ["ok", "../up", "dup", "dup", "fine"], "uri": ["u1", "u2", "u3", "u4", "u5"],
                       "mask_uri": [""] * 5, "size": [1] * 5, "etag": pa.nulls(5, pa.string()),
                       "mtime": pa.nulls(5, pa.timestamp("us", tz="UTC"))})
    checked = checked_items(listed, np.array([1, 3, 4]))
    assert [item.id for item, _ in checked] == ["../up", "dup", "fine"]
    reasons = [error.reason if error else None for _, error in checked]
    assert reasons[0].startswith("unusable id") and reasons[1] == "duplicate id (also u3)" and reasons[2] is None
    assert checked_items(listed, np.array([2]))[0][1] is None  # the first "dup" keeps the id
    assert checked_items(listed, []) == []


def entries(pairs: list[tuple[str, str]], status: str = "ok") -> pa.Table:
    return pa.Table.from_pylist([ledger.ledger_row(i, u, 1, None, None, status, None, None, 0, 3, "r")
                                 for i, u in pairs], schema=ledger.LEDGER_SCHEMA)


def test_the_ledger_lookup_is_by_id_and_uri():
    listed = pa.table({"id": ["a", "b", "c", "d"], "uri": ["u", "u", "v", "w"]})
    settled = entries([("x", "w"), ("b", "u"), ("a", "u"), ("c", "v")])  # "u" settled under two ids
    assert ledger.match(listed, settled).to_pylist() == [2, 1, 3, None]  # "w" is settled as "x", not "d"
    assert ledger.match(listed, entries([])).to_pylist() == [None] * 4
    listed = listed.append_column("size", pa.array([1] * 4, pa.int64()))
    listed = listed.append_column("etag", pa.nulls(4, pa.string()))
    listed = listed.append_column("mtime", pa.nulls(4, pa.timestamp("us", tz="UTC")))
    work, _ = ledger.select(listed, settled, max_attempts=3, reprocess_changed=True, retry_errors=False)
    assert work.tolist() == [False, False, False, True]


def test_latest_keeps_the_newest_entry_per_key_nulls_included():
    rows = [{"id": i, "uri": u, "settled_at": datetime(2025, 1, d, tzinfo=timezone.utc), "status": s}
            for i, u, d, s in [("a", "u", 1, "old"), ("a", "u", 3, "new"), ("a", None, 2, "n1"), ("a", None, 1, "n0"),
                               ("b", "u", 1, "b")]]
    kept = ledger.latest(pa.Table.from_pylist(rows), ["id", "uri"], "settled_at")
    assert sorted(kept["status"].to_pylist()) == ["b", "n1", "new"]


def test_a_tick_with_nothing_to_do_imports_neither_torch_nor_ray(tmp_path):
    incoming, output = tmp_path / "in", tmp_path / "out"
    (incoming / "cam").mkdir(parents=True)
    for name in ("a.jpg", "cam/b.png"):
        (incoming / name).write_bytes(b"not decoded: settled before")
    listed = list_input_table(str(incoming))
    ledger.write_entries(str(output), "c-before", [
        ledger.ledger_row(i, u, s, None, m, "ok", None, None, 0, 3, "before")
        for i, u, s, m in zip(*(listed[c].to_pylist() for c in ("id", "uri", "size", "mtime")))])
    # A checkpoint (its weights are hashed for the redo rule, never loaded on a no-op tick).
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"weights: hashed, not loaded")
    script = (
        "import json, sys\n"
        "from pipelines.segmentation.config import SegmentConfig\n"
        "from pipelines.segmentation.job import run_segmentation\n"
        f"r = run_segmentation(SegmentConfig(model={str(checkpoint)!r}, input={str(incoming)!r}, "
        f"output={str(output)!r}, since='last'))\n"
        "print(json.dumps({'skipped': r.skipped, 'read': r.read, "
        "'loaded': [m for m in ('torch', 'ray') if m in sys.modules]}))\n")
    stdout = run_off_cluster(script, tmp_path, timeout=120)
    assert json.loads(stdout.strip().splitlines()[-1]) == {"skipped": 2, "read": 2, "loaded": []}


def test_links_are_listed_as_fsspec_listed_them(tmp_path):
    root = tmp_path / "in"
    (root / "real").mkdir(parents=True)
    (root / "real" / "t.jpg").write_bytes(b"target")
    os.symlink(root / "real" / "t.jpg", root / "good.jpg")
    os.symlink(root / "missing.jpg", root / "broken.jpg")  # unreadable until its target appears
    os.symlink(root / "real", root / "linked")  # a linked folder is not walked into
    os.utime(root / "broken.jpg", (1_600_000_000.25,) * 2, follow_symlinks=False)
    table = list_input_table(str(root))
    got = list(zip(*(table[c].to_pylist() for c in ("id", "uri", "size", "mtime"))))
    assert got == fsspec_listing(root, tmp_path / "none")
    assert [(r[0], r[2]) for r in got] == [("broken", 0), ("good", 6), ("real/t", 6)]


def test_a_feed_reads_every_delivered_manifest_once_per_row(tmp_path):
    """A glob of manifests: rows in name order, a row repeated by a later delivery dropped, an id
    under another URI kept (it becomes a duplicate-id error), an in-progress (`.tmp-`) file
    never read; no match is an empty tick, a missing folder an error."""
    import pytest

    from pipelines.common.errors import InputError
    from pipelines.data.manifest import write_manifest

    feed = tmp_path / "feed"
    write_manifest([{"id": "a", "image_uri": "/i/a.jpg"}, {"id": "b", "image_uri": "/i/b.jpg"}],
                   str(feed / "0001.parquet"))
    write_manifest([{"id": "b", "image_uri": "/i/b.jpg"}, {"id": "c", "image_uri": "/i/c.jpg"},
                    {"id": "a", "image_uri": "/j/a.jpg"}], str(feed / "0002.parquet"))
    (feed / ".tmp-0003.parquet").write_bytes(b"half a parquet file")
    listed = list_input_table(str(feed / "*.parquet"))
    assert list(zip(listed["id"].to_pylist(), listed["uri"].to_pylist())) == [
        ("a", "/i/a.jpg"), ("b", "/i/b.jpg"), ("c", "/i/c.jpg"), ("a", "/j/a.jpg")]
    errors = [e.reason for _, e in checked_items(listed, np.arange(listed.num_rows)) if e is not None]
    assert errors == ["duplicate id (also /i/a.jpg)"]
    assert list_input_table(str(feed / "*.csv")).num_rows == 0
    with pytest.raises(InputError, match="does not exist"):
        list_input_table(str(tmp_path / "typo" / "*.parquet"))
